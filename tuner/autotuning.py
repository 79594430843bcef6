"""`autotune`: the guided search with the caller's own training step, in this process.

Where no server worker has the caller's GPU (or the model cannot be described as a spec), the
training script searches itself: `step_fn(batch_size)` runs one real training step at that
micro-batch; an out-of-memory error (caught by type, never by message) means "does not fit".
The result is uploaded with `POST /v1/probes`, so every later run and every node of the fleet
reuses it instead of searching again.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from tuner.errors import SpecError
from tuner.oom import out_of_memory_types
from tuner.results import ProbeResult
from tuner.search_types import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_TRIALS, MemoryLine, SearchConfig, Trial
from tuner.settings import get_settings
from tuner.spec import DeviceSpec, WorkloadSpec
from tuner.version import __version__

__all__ = ["autotune", "out_of_memory_types"]

StepFn = Callable[[int], object]


def autotune(
    step_fn: StepFn,
    *,
    fingerprint: str,
    workload: WorkloadSpec | None = None,
    device: DeviceSpec | None = None,
    server: str | None = None,
    strategy: str = "guided",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    min_batch_size: int = 1,
    max_trials: int = DEFAULT_MAX_TRIALS,
    prior: MemoryLine | None = None,
    upload: bool = True,
    gradient_checkpointing: bool = False,
    memory_margin: float = 0.05,
    steps_per_trial: int = 2,
    token: str | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> ProbeResult:
    """The largest micro-batch `step_fn` runs at on this GPU, as a `ProbeResult`.

    `step_fn(b)`: one full training step (forward, backward, optimizer step, zero_grad) at
    micro-batch `b`; it runs `steps_per_trial` times per trial (≥ 2: AdamW allocates its state at
    the first step). It trains the caller's model: search before loading the weights to keep,
    or reload them afterwards. Anything it raises other than an out-of-memory error propagates.
    `fingerprint`: the workload's fingerprint (`WorkloadSpec.fingerprint()`), the key under which
    the fleet finds the result. `workload`: its spec; when omitted it is looked up on the server
    from a plan with that fingerprint. `device`: default this process's CUDA GPU (required
    without CUDA). `strategy`, `min/max_batch_size`, `max_trials`, `prior`: as
    `tuner.search.find_max_batch`; guided predicts with `device memory × (1 − memory_margin)`.
    `gradient_checkpointing`: whether `step_fn` uses it (recorded, not applied).
    `upload`: store the result on the server (`server` or `TUNER_SERVER`; skipped with none);
    the uploaded result, with its id, is returned.

    Without CUDA the search runs `step_fn` on CPU (to try a step function out): the result's
    backend is `cpu`, its trials carry no peak memory, and it is never uploaded (with a server and
    `upload=True`, autotune refuses before searching; the server refuses such uploads too).
    """
    import torch

    from tuner.search import run_search

    if steps_per_trial < 1:
        raise SpecError(f"steps_per_trial must be at least 1, got {steps_per_trial}.")
    on_cuda = torch.cuda.is_available()
    device = device or _local_device(torch)
    url = server or get_settings().server
    if not on_cuda and upload and url:
        # Refused before the search: a CPU run would only be refused by the server afterwards.
        raise SpecError(
            f"autotune sees no CUDA GPU here, so its search would run on CPU, which measures nothing of "
            f"{device.name}: such a result is never uploaded. Run it on that GPU, plan for the GPU by "
            "estimate with plan_for(..., device=...), or pass upload=False to try step_fn on CPU."
        )
    bearer = token or _settings_token()
    workload = _resolve_workload(fingerprint, workload, url, bearer)
    capacity = int(device.total_memory_bytes * (1 - memory_margin)) if on_cuda else None
    trial = _trial_runner(step_fn, steps_per_trial=steps_per_trial, on_cuda=on_cuda)

    config = SearchConfig(
        strategy=strategy,  # type: ignore[arg-type]  # SearchConfig validates it
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_trials=max_trials,
    )
    started = time.perf_counter()
    search = run_search(trial, config, capacity_bytes=capacity, prior=prior, on_trial=on_trial)
    result = ProbeResult(
        fingerprint=fingerprint,
        workload=workload,
        device=device,
        # Real trials of a real step; without CUDA they measured no GPU memory, and say so.
        backend="cuda" if on_cuda else "cpu",
        gradient_checkpointing=gradient_checkpointing,
        max_batch_size=search.max_batch_size,
        strategy=config.strategy,
        stop_reason=search.stop_reason,
        trials=list(search.trials),
        memory_line=search.memory_line,
        capacity_bytes=capacity,
        seconds=time.perf_counter() - started,
        versions=_versions(torch),
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        extra={"source": "autotune", "steps_per_trial": steps_per_trial, "cuda": on_cuda},
    )
    if upload and url:
        from tuner.client import TunerClient

        with TunerClient(url, token=bearer) as client:
            return client.upload_probe(result)
    return result


def _trial_runner(step_fn: StepFn, *, steps_per_trial: int, on_cuda: bool) -> Callable[[int], Trial]:
    import torch

    oom_types = out_of_memory_types(torch)

    def run(batch_size: int) -> Trial:
        _release_memory(torch, on_cuda)
        retries_before = 0
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
            retries_before = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
        started = time.perf_counter()
        last_step = 0.0
        try:
            for _ in range(steps_per_trial):
                step_started = time.perf_counter()
                step_fn(batch_size)
                if on_cuda:
                    torch.cuda.synchronize()
                last_step = time.perf_counter() - step_started
        except oom_types:
            failed = True
        else:
            failed = False
        seconds = time.perf_counter() - started
        # Outside the except block: the error's traceback (and the tensors its frames hold) is gone.
        if failed:
            _release_memory(torch, on_cuda)
            return Trial(batch_size, ok=False, seconds=seconds, error="out_of_memory")
        peaks: dict[str, Any] = {}
        if on_cuda:
            peaks = {
                "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "num_alloc_retries": int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
                - retries_before,
            }
        return Trial(
            batch_size,
            ok=True,
            seconds=seconds,
            samples_per_second=batch_size / last_step if last_step > 0 else None,
            **peaks,
        )

    return run


def _release_memory(torch: Any, on_cuda: bool) -> None:
    """Drop what the last trial left (reference cycles, cached blocks) so the next starts clean."""
    gc.collect()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _local_device(torch: Any) -> DeviceSpec:
    if not torch.cuda.is_available():
        raise SpecError(
            "autotune measures on this process's CUDA GPU and none is visible: run it on the GPU you "
            "train on, or plan for a GPU by estimate with plan_for(..., device=DeviceSpec(...)). "
            "To try step_fn on CPU, pass device= and upload=False (the result's backend is then 'cpu')."
        )
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return DeviceSpec(name=str(properties.name), total_memory_bytes=int(properties.total_memory))


def _resolve_workload(
    fingerprint: str, workload: WorkloadSpec | None, url: str | None, token: str | None
) -> WorkloadSpec:
    if workload is not None:
        if workload.fingerprint() != fingerprint:
            raise SpecError(
                f"fingerprint {fingerprint[:12]}… is not that of the given workload "
                f"({workload.fingerprint()[:12]}…): the fleet would file the result under the wrong key."
            )
        return workload
    if not url:
        raise SpecError(
            "autotune needs workload= (the WorkloadSpec the fingerprint belongs to) without a server."
        )
    from tuner.client import TunerClient

    with TunerClient(url, token=token) as client:
        page = client.list_plans(limit=1, fingerprint=fingerprint)
    if not page.items:
        raise SpecError(
            f"The server knows no workload with fingerprint {fingerprint[:12]}…: pass workload= "
            "(the WorkloadSpec it belongs to)."
        )
    return page.items[0].workload


def _settings_token() -> str | None:
    token = get_settings().api_token
    return token.get_secret_value() if token else None


def _versions(torch: Any) -> dict[str, str]:
    versions = {"torch": str(torch.__version__), "tuner": __version__}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        versions["transformers"] = str(transformers.__version__)
    return versions
