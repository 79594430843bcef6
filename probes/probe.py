"""`run_probe`: the one orchestrator every caller uses (CLI, worker, benchmarks).

The whole search runs in one spawned child, so that the estimator's process-global patches, a
CUDA crash, an abort or a hang never reach the caller: each becomes a `ProbeError` with a clear
message. Each trial flows back to the caller as it finishes (`progress`).

- `estimate`: trials are fake-tensor traces against `device.total_memory_bytes` (required);
  guided search pins its own line with two cheap traces.
- `cuda`: trials run on the local GPU (a request for another device is refused). The estimator's
  line, when it can be had in its own child within its time limit, is the guided search's prior;
  otherwise the search goes without (noted in `extra["prior"]`). The line is traced while the
  search child starts, initialises CUDA and builds the model, and reaches it through a pipe:
  the search waits only for what is left of the trace. With `verify_steps`, the answer is run
  for that many steps in a fresh process, stepping down until one survives.

Tests and benchmarks can swap the trial function: `trial_factory="package.module:function"`
names a function `(spec, *, gradient_checkpointing, device) -> TrialBackend` that runs in the
child instead of the real backend.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any, Literal

from probes.child import ChildFailed, run_in_child, send_progress
from tuner.alloc_conf import canonical_alloc_conf, parse_alloc_conf
from tuner.errors import CLIENT_FAULT_CODES, DeviceRequiredError, ProbeError, SpecError, client_fault_error
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.results import ProbeResult, WorkloadFacts
from tuner.search import MemoryLine, SearchResult, Trial, run_search
from tuner.search_types import DEFAULT_SEARCH, SearchConfig
from tuner.settings import DEFAULT_ESTIMATE_TIMEOUT_SECONDS, DEFAULT_PROBE_TIMEOUT_SECONDS
from tuner.spec import Backend, DeviceSpec, StepKind, WorkloadSpec
from tuner.version import __version__ as tuner_version

EXPANDABLE_SEGMENTS = "expandable_segments:True"
PRIOR_BATCH_SIZES = (4, 16)
"""Where the estimator's prior line is traced: past the small sizes where a checkpointing floor
flattens memory, and as cheap as any (fake tensors hold no data)."""
VERIFY_ATTEMPTS = 4
"""Fresh-process verifications before the probe gives up on an answer."""
STEP_DOWN_FRACTION = 0.02
"""A failed verification steps down by 2 % of the batch size (at least one)."""
PRIOR_HANDOVER_SECONDS = 30.0
"""How much longer than the prior's own time limit the search child waits for it: the parent
always sends something (a line or None) once the prior's child has ended."""


@dataclass
class TrialBackend:
    """What a search needs from a backend, inside the child."""

    fits: Callable[[int], Trial]
    device: DeviceSpec
    capacity_bytes: int | None
    facts: WorkloadFacts | None = None
    verify: Callable[[int, int], Trial] | None = None
    """`verify(batch_size, steps)`: the answer held for `steps` iterations."""
    close: Callable[[], None] | None = None
    prepare: Callable[[], None] | None = None
    """Work the first trial would do anyway (building the model), done while the prior is traced."""
    versions: dict[str, str] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    """What the result's `extra` should say about how the trials ran (e.g. an emulated card)."""


@dataclass(frozen=True)
class _Job:
    spec: WorkloadSpec
    backend: Backend
    device: DeviceSpec | None
    gradient_checkpointing: bool
    search: SearchConfig
    trial_factory: str | None
    prior_timeout: float | None = None
    """Set when a prior is traced beside the search: how long the search may wait for it."""
    alloc_conf: str | None = None
    """The canonical `PYTORCH_CUDA_ALLOC_CONF` the probe runs under (None: PyTorch's default)."""
    allocator_hint: bool = True
    """Also search the expandable-segments alternative (estimate, default allocator)."""
    step: StepKind = "train"
    """The step each trial runs: the train step, or the eval forward (`probes.eval_step`)."""
    parallel: ParallelSetup = SINGLE
    """The data-parallel job one rank of which is probed (`probes.parallel`)."""


@dataclass(frozen=True)
class _Outcome:
    search: SearchResult
    device: DeviceSpec
    capacity_bytes: int | None
    facts: WorkloadFacts | None
    versions: dict[str, str]
    seconds: float
    prior_wait_seconds: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def run_probe(
    spec: WorkloadSpec,
    *,
    backend: Literal["cuda", "estimate"],
    device: DeviceSpec | None = None,
    gradient_checkpointing: bool,
    search: SearchConfig = DEFAULT_SEARCH,
    verify_steps: int = 0,
    timeout: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
    prior_timeout: float = DEFAULT_ESTIMATE_TIMEOUT_SECONDS,
    progress: Callable[[Trial], None] | None = None,
    trial_factory: str | None = None,
    estimate_prior: bool | None = None,
    alloc_conf: str | None = None,
    step: StepKind = "train",
    allocator_hint: bool | None = None,
    parallel: ParallelSetup = SINGLE,
) -> ProbeResult:
    """The largest micro-batch of `spec` on a device, with every trial that led there.

    `search`: the strategy, the micro-batch range and the trial budget (`SearchConfig`).
    `step="eval"`: the largest eval batch instead (forward only under `torch.no_grad()`, the
    model in eval mode, the parameters and the optimizer's state resident; `probes.eval_step`).

    `alloc_conf`: the `PYTORCH_CUDA_ALLOC_CONF` the training run will use (None: PyTorch's default
    allocator); the estimate backend models it, the cuda backend's child runs under it. Where the
    default allocator was probed on the estimate backend, `extra` also says how large a micro-batch
    `expandable_segments:True` would allow (`expandable_segments_max_batch_size`).
    `allocator_hint`: whether that alternative is searched (default: for the train step; an
    eval probe's plan gives no allocator hint).
    `estimate_prior`: whether a guided cuda search gets the estimator's line as its prior
    (default: yes, except with a `trial_factory`, whose memory the estimator does not model).
    `timeout` bounds the probe's child, `prior_timeout` the prior's trace: the caller passes its
    settings (`probe_timeout_seconds`, `estimate_timeout_seconds`); nothing here reads them.
    `parallel`: the data-parallel job (strategy and world size) of which one rank is probed;
    the estimate's memory per category at the answer is in `extra["memory_per_rank"]`."""
    _check_probe_request(backend, device, verify_steps)
    started = time.monotonic()
    notes: dict[str, Any] = {}
    job = _Job(
        spec=spec,
        backend=backend,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        search=search,
        trial_factory=trial_factory,
        alloc_conf=canonical_alloc_conf(alloc_conf),
        allocator_hint=step == "train" if allocator_hint is None else allocator_hint,
        step=step,
        parallel=parallel,
    )
    prior = _start_prior(job, estimate_prior, min(timeout, prior_timeout), notes)
    if prior is not None:
        job = replace(job, prior_timeout=prior.timeout + PRIOR_HANDOVER_SECONDS)
    outcome = _search_beside_prior(job, prior, timeout=timeout, progress=progress)
    notes["search_wall_seconds"] = time.monotonic() - started
    if outcome.prior_wait_seconds is not None:
        notes["prior_wait_seconds"] = outcome.prior_wait_seconds
    answer, verified = _verified_answer(job, outcome.search.max_batch_size, verify_steps, timeout, notes)
    return _probe_result(job, outcome, answer, verified, seconds=time.monotonic() - started, notes=notes)


def _check_probe_request(backend: str, device: DeviceSpec | None, verify_steps: int) -> None:
    """Refuse, before any child starts, what no probe can run."""
    if backend not in ("cuda", "estimate"):
        raise SpecError(f"Unknown probe backend {backend!r}: use 'cuda' or 'estimate'.")
    if backend == "estimate" and device is None:
        raise DeviceRequiredError(
            "The estimate backend needs a device with total_memory_bytes (e.g. --device-memory 80GiB)."
        )
    if verify_steps < 0:
        raise SpecError(f"verify_steps must not be negative, got {verify_steps}.")


def _start_prior(
    job: _Job, estimate_prior: bool | None, timeout: float, notes: dict[str, Any]
) -> _PriorInBackground | None:
    """The estimator's line, traced beside a guided cuda search that wants one (by default, one
    without a trial factory, whose memory the estimator does not model); None otherwise."""
    wanted = job.trial_factory is None if estimate_prior is None else estimate_prior
    if job.backend != "cuda" or job.search.strategy != "guided" or not wanted:
        return None
    return _PriorInBackground(
        job.spec, job.gradient_checkpointing, timeout, notes, job.alloc_conf, job.step, job.parallel
    )


def _search_beside_prior(
    job: _Job,
    prior: _PriorInBackground | None,
    *,
    timeout: float,
    progress: Callable[[Trial], None] | None,
) -> _Outcome:
    """The search, in its child, taking the prior (where one is traced) through its pipe."""
    what = f"{job.backend} probe" if job.step == "train" else f"{job.backend} eval probe"
    try:
        outcome: _Outcome = _in_child(
            _search_in_child,
            job,
            None if prior is None else prior.inbox,
            timeout=timeout,
            what=what,
            on_message=progress,
        )
    except BaseException:
        if prior is not None:
            prior.close(wait=False)  # the trace ends by itself, within its own time limit
        raise
    if prior is not None:
        prior.close(wait=True)  # the search took the prior: its thread is ending
    return outcome


def _verified_answer(
    job: _Job, answer: int, verify_steps: int, timeout: float, notes: dict[str, Any]
) -> tuple[int, int | None]:
    """The answer after the verification `verify_steps` asks for, and the steps it survived
    (None when not verified); `notes["verification"]` says how it went."""
    if not verify_steps or answer <= 0:
        return answer, None
    if job.backend == "estimate":
        notes["verification"] = "skipped: an estimate is deterministic, there is nothing to run again"
        return answer, None
    answer, verified, notes["verification"] = _verify(job, answer, verify_steps, timeout)
    return answer, verified


def _probe_result(
    job: _Job,
    outcome: _Outcome,
    answer: int,
    verified: int | None,
    *,
    seconds: float,
    notes: dict[str, Any],
) -> ProbeResult:
    return ProbeResult(
        fingerprint=job.spec.fingerprint(),
        workload=job.spec,
        device=outcome.device,
        backend=job.backend,
        gradient_checkpointing=job.gradient_checkpointing,
        max_batch_size=answer,
        strategy=job.search.strategy,
        stop_reason=outcome.search.stop_reason,
        trials=outcome.search.trials,
        memory_line=outcome.search.memory_line,
        capacity_bytes=outcome.capacity_bytes,
        seconds=seconds,
        versions=outcome.versions,
        alloc_conf=job.alloc_conf,
        step=job.step,
        parallelism=job.parallel.probe_key,
        facts=outcome.facts,
        verified_steps=verified,
        extra={"search_seconds": outcome.seconds, **outcome.extra, **notes},
    )


def _in_child(fn: Callable[..., Any], *args: Any, timeout: float, what: str, **kwargs: Any) -> Any:
    """`run_in_child`, with a failure of the child told as a probe error naming what failed."""
    try:
        return run_in_child(fn, *args, timeout=timeout, what=what, **kwargs)
    except ChildFailed as exc:
        code = exc.failure.error_code
        if code in CLIENT_FAULT_CODES and exc.failure.kind == "exception":
            # The request's own fault (a model that cannot be built...): its own error class.
            raise client_fault_error(str(code), exc.message) from None
        if code is not None:
            raise  # any other TunerError from the child keeps its code
        if exc.failure.kind == "exception":
            # `from exc`: the child's traceback stays reachable (`probes.child.child_traceback`).
            raise ProbeError(f"The {what} failed: {exc.message}") from exc
        raise ProbeError(exc.message) from None  # a crash or a timeout: the message names `what`


# ---------------------------------------------------------------------------- inside the child


def _search_in_child(job: _Job, prior_inbox: Connection | None) -> _Outcome:
    started = time.monotonic()
    _use_alloc_conf(job.alloc_conf)
    backend = _make_backend(job)
    # A card whose usable memory is nothing: no prediction to make, every trial will fail.
    capacity = backend.capacity_bytes if backend.capacity_bytes and backend.capacity_bytes > 0 else None
    prior: MemoryLine | None = None
    waited: float | None = None
    try:
        if prior_inbox is not None:
            if backend.prepare is not None:
                backend.prepare()  # build the model while the estimator is still tracing
            waiting_since = time.monotonic()
            prior = _receive_prior(prior_inbox, job.prior_timeout or 0.0)
            waited = time.monotonic() - waiting_since
        search = run_search(
            backend.fits, job.search, capacity_bytes=capacity, prior=prior, on_trial=send_progress
        )
        # The cuda backend learns the facts when it first builds the model.
        facts = backend.facts if backend.facts is not None else getattr(backend.fits, "facts", None)
        wanted = job.trial_factory is None and job.allocator_hint
        extra = _expandable_alternative(job, search) if wanted else {}
        extra.update(_memory_per_rank(job, search))
        extra.update(backend.notes)
    finally:
        if backend.close is not None:
            backend.close()
    return _Outcome(
        search=search,
        device=backend.device,
        capacity_bytes=backend.capacity_bytes,
        facts=facts,
        versions=backend.versions,
        seconds=time.monotonic() - started,
        prior_wait_seconds=waited,
        extra=extra,
    )


def _use_alloc_conf(alloc_conf: str | None) -> None:
    """Run this child under the probe's allocator setting. CUDA reads it when its allocator first
    initialises, which in a fresh child is later than this."""
    if alloc_conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)


def _expandable_alternative(job: _Job, search: SearchResult) -> dict[str, Any]:
    """For an estimate of the default allocator: the largest micro-batch with expandable segments,
    searched from the answer up on the same traces (a hint for the plan, never its answer)."""
    if job.backend != "estimate" or job.device is None or search.max_batch_size < 1:
        return {}
    if parse_alloc_conf(job.alloc_conf).expandable_segments:
        return {}
    from probes.estimate.session import estimate_fits

    fits = estimate_fits(
        job.spec,
        job.device.total_memory_bytes,
        gradient_checkpointing=job.gradient_checkpointing,
        alloc_conf=EXPANDABLE_SEGMENTS,
        step=job.step,
        parallel=job.parallel,
    )
    upward = replace(
        job.search,
        strategy="doubling",
        min_batch_size=search.max_batch_size,
        max_batch_size=min(job.search.max_batch_size, 2 * search.max_batch_size + 8),
        tolerance=0,
    )
    alternative = run_search(fits, upward)
    return {"expandable_segments_max_batch_size": alternative.max_batch_size}


def _memory_per_rank(job: _Job, search: SearchResult) -> dict[str, Any]:
    """For an estimate: one rank's traced bytes per category (parameters, gradients, DDP's buckets,
    optimizer state, activations) at the peak of the answer's step."""
    if job.backend != "estimate" or job.trial_factory is not None or search.max_batch_size < 1:
        return {}
    from probes.estimate.session import current_session

    report = current_session().trace(
        job.spec,
        search.max_batch_size,
        gradient_checkpointing=job.gradient_checkpointing,
        alloc_conf=job.alloc_conf,
        step=job.step,
        parallel=job.parallel,
    )
    return {"memory_per_rank": dict(report.categories)}


def _receive_prior(inbox: Connection, timeout: float) -> MemoryLine | None:
    """The prior the parent hands over, or None when it sends none in time."""
    try:
        if inbox.poll(timeout):
            line: MemoryLine | None = inbox.recv()
            return line
    except (EOFError, OSError):
        pass  # the parent closed its end without sending: search without a prior
    return None


def _verify_in_child(job: _Job, batch_size: int, steps: int) -> Trial:
    _use_alloc_conf(job.alloc_conf)
    backend = _make_backend(job)
    if backend.verify is None:
        raise ProbeError(f"The {job.backend} backend cannot verify an answer.")
    try:
        return backend.verify(batch_size, steps)
    finally:
        if backend.close is not None:
            backend.close()


def _make_backend(job: _Job) -> TrialBackend:
    if job.trial_factory is not None:
        factory = _import_factory(job.trial_factory)
        made = factory(job.spec, gradient_checkpointing=job.gradient_checkpointing, device=job.device)
        if not isinstance(made, TrialBackend):
            raise ProbeError(f"The trial factory {job.trial_factory!r} did not return a TrialBackend.")
        return made
    if job.backend == "estimate":
        return _estimate_backend(job)
    return _cuda_backend(job)


def _import_factory(path: str) -> Callable[..., Any]:
    module_name, _, name = path.partition(":")
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise ProbeError(f"The trial factory {path!r} is not a function.")
    return function  # type: ignore[no-any-return]


def _versions(**extra: str | None) -> dict[str, str]:
    found = {"tuner": tuner_version}
    for package in ("torch", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    found.update({k: v for k, v in extra.items() if v})
    return found


def _estimate_backend(job: _Job) -> TrialBackend:
    from probes.estimate.session import current_session, estimate_fits

    assert job.device is not None  # run_probe refuses an estimate without a device
    total = job.device.total_memory_bytes
    fits = estimate_fits(
        job.spec,
        total,
        gradient_checkpointing=job.gradient_checkpointing,
        alloc_conf=job.alloc_conf,
        step=job.step,
        parallel=job.parallel,
    )
    return TrialBackend(
        fits=fits,
        device=job.device,
        capacity_bytes=current_session().capacity_bytes(total),
        facts=_facts_on_meta(job.spec),
        versions=_versions(),
        notes=current_session().notes,  # filled in by the traces: read after the search
    )


def _facts_on_meta(spec: WorkloadSpec) -> WorkloadFacts | None:
    """Parameter counts from a model built on the meta device (no memory, no data)."""
    from probes.workloads import build_workload

    try:
        return build_workload(spec, device="meta").facts
    except Exception:  # facts are a courtesy; the estimate itself reports build errors
        return None


def _cuda_backend(job: _Job) -> TrialBackend:
    import torch

    from probes import cuda
    from probes.estimate.device_model import DEFAULT_DEVICE_MODEL

    local = cuda.local_device()
    emulation = cuda.plan_emulation(
        job.device, local, context_overhead_bytes=DEFAULT_DEVICE_MODEL.context_overhead_bytes
    )
    if emulation is not None:
        cuda.apply_emulation(emulation)  # before the first allocation: the cap holds from the start
    trials = cuda.CudaTrials(
        job.spec, gradient_checkpointing=job.gradient_checkpointing, step=job.step, parallel=job.parallel
    )
    capacity = cuda.usable_capacity_bytes() if emulation is None else emulation.allocator_limit_bytes

    return TrialBackend(
        fits=trials,
        device=local if emulation is None else emulation.target,
        capacity_bytes=capacity,
        notes={} if emulation is None else {"emulated_on": emulation.describe()},
        verify=trials.verify,
        close=trials.close,
        prepare=trials.prepare,
        versions=_versions(cuda=torch.version.cuda),
    )


# ------------------------------------------------------------------------------ in the parent


class _PriorInBackground:
    """The estimator's line, traced in its own child (from a thread of the caller) while the search
    child starts up, and handed to the search child through `inbox` (None when it cannot be had).

    The search child then builds its model and initialises CUDA, seconds of work that no longer
    wait for the trace; the notes record the prior (or why there is none) and its seconds."""

    def __init__(
        self,
        spec: WorkloadSpec,
        gradient_checkpointing: bool,
        timeout: float,
        notes: dict[str, Any],
        alloc_conf: str | None = None,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> None:
        self.timeout = timeout
        self.inbox, self._outbox = mp.get_context("spawn").Pipe(duplex=False)
        self._thread = threading.Thread(
            target=self._trace,
            args=(spec, gradient_checkpointing, notes, alloc_conf, step, parallel),
            name="tuner-prior",
            daemon=True,
        )
        self._thread.start()

    def _trace(
        self,
        spec: WorkloadSpec,
        gradient_checkpointing: bool,
        notes: dict[str, Any],
        alloc_conf: str | None,
        step: StepKind,
        parallel: ParallelSetup,
    ) -> None:
        started = time.monotonic()
        line = None
        try:
            line = _prior_line(spec, gradient_checkpointing, self.timeout, notes, alloc_conf, step, parallel)
        finally:
            notes["prior_seconds"] = time.monotonic() - started
            # A few hundred bytes, which the pipe holds until the search reads them; a search that
            # has already ended has closed its end, and there is nobody left to tell.
            with contextlib.suppress(OSError):
                self._outbox.send(line)
            self._outbox.close()

    def close(self, *, wait: bool) -> None:
        """Close the search's end of the pipe; with `wait`, first let the thread finish."""
        if wait:
            self._thread.join()
        self.inbox.close()


def _prior_line(
    spec: WorkloadSpec,
    gradient_checkpointing: bool,
    timeout: float,
    notes: dict[str, Any],
    alloc_conf: str | None = None,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> MemoryLine | None:
    """The estimator's line for the guided search, or None with a note saying why not."""
    try:
        line: MemoryLine = _in_child(
            _estimate_line_in_child,
            spec,
            gradient_checkpointing,
            alloc_conf,
            step,
            parallel,
            timeout=timeout,
            what="prior estimate",
        )
    except ProbeError as exc:  # the search can go without a prior: note it, do not fail
        notes["prior"] = f"none: {exc.message}"
        return None
    notes["prior"] = {"fixed_bytes": line.fixed_bytes, "per_sample_bytes": line.per_sample_bytes}
    return line


def _estimate_line_in_child(
    spec: WorkloadSpec,
    gradient_checkpointing: bool,
    alloc_conf: str | None,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> MemoryLine:
    from probes.estimate.session import estimate_line

    line: MemoryLine = estimate_line(
        spec,
        gradient_checkpointing=gradient_checkpointing,
        batch_sizes=PRIOR_BATCH_SIZES,
        alloc_conf=alloc_conf,
        step=step,
        parallel=parallel,
    )
    return line


def _verify(
    job: _Job, answer: int, steps: int, timeout: float
) -> tuple[int, int | None, list[dict[str, Any]]]:
    """Run the answer for `steps` iterations in a fresh process; step down until one survives.

    Returns the surviving size, the steps it survived and the log of attempts. Raises a
    `ProbeError` when no attempt survives."""
    size = answer
    log: list[dict[str, Any]] = []
    for _ in range(VERIFY_ATTEMPTS):
        trial: Trial = _in_child(
            _verify_in_child, job, size, steps, timeout=timeout, what=f"verification at batch size {size}"
        )
        log.append({"batch_size": size, "ok": trial.ok, "peak_reserved_bytes": trial.peak_reserved_bytes})
        if trial.ok:
            return size, steps, log
        smaller = size - max(1, round(size * STEP_DOWN_FRACTION))
        if smaller < job.search.min_batch_size:
            break
        size = smaller
    raise ProbeError(
        f"The answer {answer} did not survive {steps} steps in a fresh process, nor did "
        f"{len(log) - 1} smaller sizes down to {size}; the boundary is too noisy to trust."
    )
