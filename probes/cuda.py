"""The `cuda` backend: real trials of the canonical train step on the local GPU.

A trial builds the workload on the GPU, runs at least two full iterations at batch size b (the
optimizer's state only exists from the first `step()` on, so the second iteration is the one
that counts) and records peak allocated and reserved bytes, the allocator's retries, and the
last iteration's time. Running out of memory is a verdict, detected by exception type; any other
error propagates. Everything the trial allocated is released before the next one.

Meant to run inside a spawned child (`probes.probe` does that): a CUDA crash, an abort or a hang
must never reach the process that asked.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from probes.eval_step import prepare_training_state, run_eval_steps
from probes.parallel import wrap_one_rank
from probes.step import Phase, StepReport, run_train_steps
from probes.workloads import BuiltWorkload, build_workload
from tuner.errors import ProbeError
from tuner.oom import out_of_memory_types
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.results import WorkloadFacts
from tuner.search_types import Trial
from tuner.spec import DeviceSpec, StepKind, WorkloadSpec

KERNEL_ALLOWANCE_BYTES = 256 << 20
"""Memory outside the allocator that appears only once kernels load (lazy module loading), after
the capacity is measured: kept out of the capacity that predictions aim at."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error (by type, never by message text)."""
    return isinstance(exc, out_of_memory_types(torch))


def require_cuda() -> None:
    """Refuse clearly where no GPU is visible."""
    if not torch.cuda.is_available():
        raise ProbeError(
            "The cuda backend needs a CUDA GPU, and this machine has none; use the estimate backend."
        )


def local_device() -> DeviceSpec:
    """The GPU this process probes (device 0 of those visible)."""
    require_cuda()
    props = torch.cuda.get_device_properties(0)
    return DeviceSpec(name=str(props.name), total_memory_bytes=int(props.total_memory))


@dataclass(frozen=True)
class Emulation:
    """A smaller card measured on this one: the caching allocator is capped at what the smaller
    card would leave it (`torch.cuda.set_per_process_memory_fraction`), with the smaller card's
    CUDA context and kernels modelled (the device model's `context_overhead_bytes`), not this
    card's, which lie outside the cap."""

    target: DeviceSpec
    """The card the probe answers for."""
    host: DeviceSpec
    """The card it runs on."""
    allocator_limit_bytes: int
    """What the allocator may reserve: the target's memory less its modelled context."""

    @property
    def fraction(self) -> float:
        return self.allocator_limit_bytes / self.host.total_memory_bytes

    def describe(self) -> str:
        return (
            f"{self.target.name} ({self.target.total_memory_bytes} bytes) emulated on {self.host.name} "
            f"({self.host.total_memory_bytes} bytes): the allocator capped at "
            f"{self.allocator_limit_bytes} bytes"
        )


def plan_emulation(
    requested: DeviceSpec | None, local: DeviceSpec, *, context_overhead_bytes: int
) -> Emulation | None:
    """None for this machine's own GPU; an `Emulation` for a smaller card. A larger card, or one
    whose whole memory is less than the CUDA context, is refused: it cannot be measured here."""
    if requested is None:
        return None
    same_memory = (
        abs(requested.total_memory_bytes - local.total_memory_bytes) <= 0.01 * local.total_memory_bytes
    )
    if same_memory and requested.name == local.name:
        return None
    if requested.total_memory_bytes >= 0.99 * local.total_memory_bytes:
        raise ProbeError(
            f"The probe was asked for {requested.name} ({requested.total_memory_bytes} bytes) "
            f"but this machine's GPU is {local.name} ({local.total_memory_bytes} bytes): only a "
            "smaller card can be emulated on it."
        )
    limit = requested.total_memory_bytes - context_overhead_bytes
    if limit <= 0:
        raise ProbeError(
            f"{requested.name} ({requested.total_memory_bytes} bytes) is smaller than the CUDA "
            f"context and kernels alone ({context_overhead_bytes} bytes): nothing can train on it."
        )
    return Emulation(target=requested, host=local, allocator_limit_bytes=limit)


def apply_emulation(emulation: Emulation) -> None:
    """Cap this process's caching allocator at the emulated card's share of this one."""
    torch.cuda.set_per_process_memory_fraction(emulation.fraction, 0)


def usable_capacity_bytes() -> int:
    """Bytes the caching allocator can still reach: free device memory plus what it already
    holds, less an allowance for kernels that load later. Other processes' memory and the CUDA
    context are outside it."""
    free, _total = torch.cuda.mem_get_info()
    return max(0, int(free) + int(torch.cuda.memory_reserved()) - KERNEL_ALLOWANCE_BYTES)


def release_memory() -> None:
    """Return every cached block to the driver, so that the next trial starts from a clean pool."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class CudaTrials:
    """`fits(b) -> Trial` on the local GPU for one workload and checkpointing choice.

    The model is built once and reused while trials pass (its weights are part of every trial's
    peak anyway); each trial makes a fresh optimizer, so its state is created lazily as in
    training. After an out-of-memory error the model is rebuilt, since a step may have stopped
    half-way through its update.

    `step="eval"`: each trial runs eval forwards (`probes.eval_step`) with the training state
    resident. That state (one optimizer, its state created by one real train step when the model
    is built, the gradients freed) lives as long as the model, as in a training run that pauses
    to evaluate; each trial's peak is measured from after it was made.
    """

    def __init__(
        self,
        spec: WorkloadSpec,
        *,
        gradient_checkpointing: bool,
        iterations: int = 2,
        seed: int = 0,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> None:
        if iterations < 2:
            raise ProbeError("A GPU trial needs at least two iterations (optimizer state is created lazily).")
        require_cuda()
        self.spec = spec
        self.gradient_checkpointing = gradient_checkpointing
        self.iterations = iterations
        self.seed = seed
        self.step: StepKind = step
        self.parallel = parallel
        """One rank of this job is what runs (`probes.parallel.wrap_one_rank`)."""
        self._workload: BuiltWorkload | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.facts: WorkloadFacts | None = None

    def _build(self) -> BuiltWorkload:
        if self._workload is None:
            built = build_workload(
                self.spec, device="cuda", gradient_checkpointing=self.gradient_checkpointing, seed=self.seed
            )
            self.facts = built.facts
            workload = wrap_one_rank(built, self.parallel)
            if self.step == "eval":
                optimizer = workload.make_optimizer()
                prepare_training_state(workload, optimizer, data_dependent=self._data_dependent)
                self._optimizer = optimizer
            self._workload = workload
        return self._workload

    @property
    def _data_dependent(self) -> bool:
        # Over a fake group the gathered parameters hold no real values: no value is read, so
        # that a GradScaler cannot skip the step that creates the optimizer's state.
        return self.parallel.parallelism.strategy == "none"

    def _steps(
        self, workload: BuiltWorkload, batch_size: int, iterations: int, phases: _PeakPhases
    ) -> StepReport:
        run_steps = run_eval_steps if self.step == "eval" else run_train_steps
        return run_steps(
            workload,
            batch_size,
            iterations=iterations,
            on_phase=phases.enter,
            synchronize=torch.cuda.synchronize,
            data_dependent=self._data_dependent,
        )

    def prepare(self) -> None:
        """Build the model now, as the first trial would, so that the build overlaps other work
        (the estimator's prior). A model too large for the card is left to that trial to report."""
        out_of_memory = False
        try:
            self._build()
        except BaseException as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True  # outside the except block: its traceback pins the tensors
        if out_of_memory:
            self.close()

    def close(self) -> None:
        """Drop the model (and an eval probe's training state) and return its memory."""
        self._workload = None
        self._optimizer = None
        release_memory()

    def __call__(self, batch_size: int) -> Trial:
        return self.run(batch_size, iterations=self.iterations)

    def run(self, batch_size: int, *, iterations: int) -> Trial:
        """One trial of `iterations` steps at `batch_size`."""
        release_memory()
        started = time.perf_counter()
        retries_before = _alloc_retries()
        phases = _PeakPhases()
        steps: Any = None
        out_of_memory = False
        try:
            workload = self._build()
            if self.step == "eval":
                release_memory()  # the training-state step's activations: cached, not in use
            torch.cuda.reset_peak_memory_stats()
            steps = self._steps(workload, batch_size, iterations, phases)
        except BaseException as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True  # leave the except block first: its traceback pins the tensors
        if out_of_memory:
            self.close()  # a step may have stopped half-way through its update: rebuild next time
            return Trial(
                batch_size=batch_size,
                ok=False,
                seconds=time.perf_counter() - started,
                num_alloc_retries=_alloc_retries() - retries_before,
                error="out_of_memory",
            )
        phases.enter(None, iterations)
        trial = Trial(
            batch_size=batch_size,
            ok=True,
            peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
            peak_reserved_bytes=int(torch.cuda.max_memory_reserved()),
            seconds=time.perf_counter() - started,
            num_alloc_retries=_alloc_retries() - retries_before,
            samples_per_second=batch_size / steps.seconds[-1] if steps.seconds[-1] > 0 else None,
            step_seconds=steps.seconds[-1],
            peak_phase=phases.peak_phase,
        )
        del steps
        release_memory()
        return trial

    def verify(self, batch_size: int, steps: int) -> Trial:
        """The answer held for `steps` iterations (meant for a fresh process)."""
        return self.run(batch_size, iterations=max(2, steps))


class _PeakPhases:
    """Which phase the peak happened in: the one during which `max_memory_allocated` last rose
    (the allocator's statistics are kept on the host, so no synchronisation is needed)."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.peak = 0
        self.peak_phase: str | None = None

    def enter(self, phase: Phase | None, _iteration: int) -> None:
        peak = int(torch.cuda.max_memory_allocated())
        if self.current is not None and peak > self.peak:
            self.peak, self.peak_phase = peak, self.current
        self.current = phase


def _alloc_retries() -> int:
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
