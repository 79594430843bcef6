"""One estimate: the canonical train step traced on fake CPU tensors, its peak live bytes.

`trace_step` runs in the current process and needs the CUDA emulation installed (an
`EstimateSession` does both); `probes.estimate.remote.estimate_peak` runs it in a fresh child
process, since the emulation's patches are process-global. The trace's allocation log is then
replayed through the caching-allocator model (`StepTrace.report`, `probes.estimate.device_model`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from probes.estimate import emulation
from probes.estimate.allocator import AllocationLog
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, DeviceModel, compute_dtype_bytes
from probes.estimate.report import EstimateReport
from probes.estimate.tracker import MemoryTracker
from probes.estimate.value_reads import ValueReads, user_location
from probes.parallel import Rank, local_tensors
from probes.workloads import BuiltWorkload
from tuner.alloc_conf import AllocatorSettings, parse_alloc_conf
from tuner.errors import EstimateError, TunerError
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.spec import StepKind, WorkloadSpec

__all__ = ["StepTrace", "trace_peak", "trace_step"]

_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)
WARMUP_BATCH_SIZE = 1
"""The smaller step whose history every estimate also replays (`DeviceModel.replay`)."""


@dataclass
class StepTrace:
    """One traced run of the canonical step: its allocation log and what the tracker saw."""

    batch_size: int
    gradient_checkpointing: bool
    compute_dtype_bytes: int
    log: AllocationLog
    peak_bytes: int
    peak_phase: str
    peak_iteration: int
    peak_categories: dict[str, int]
    peak_by_phase: dict[str, int]
    ops: tuple[str, ...]
    seconds: float
    assumptions: tuple[str, ...] = ()
    """What the trace assumed for the values it could not read (`probes.estimate.value_reads`)."""

    def report(
        self, device_model: DeviceModel, settings: AllocatorSettings, *, warmup: AllocationLog | None = None
    ) -> EstimateReport:
        """The estimate on a card of unbounded memory with the allocator `settings` (the worse of
        a fresh process and one that first ran the `warmup` step)."""
        started = time.perf_counter()
        activations = self.peak_categories.get("activations", 0)
        stats = device_model.replay(
            self.log,
            settings,
            activation_bytes=activations,
            gradient_checkpointing=self.gradient_checkpointing,
            compute_dtype_bytes=self.compute_dtype_bytes,
            warmup=warmup,
        )
        return EstimateReport(
            batch_size=self.batch_size,
            peak_allocated_bytes=stats.peak_allocated_bytes,
            peak_reserved_bytes=stats.peak_reserved_bytes,
            peak_phase=self.peak_phase,
            categories=dict(self.peak_categories),
            seconds=self.seconds + time.perf_counter() - started,
            gradient_checkpointing=self.gradient_checkpointing,
            traced_peak_bytes=self.peak_bytes,
            peak_iteration=self.peak_iteration,
            peak_by_phase=dict(self.peak_by_phase),
            ops=self.ops,
            activation_slack_bytes=device_model.slack_bytes(
                activations,
                gradient_checkpointing=self.gradient_checkpointing,
                compute_dtype_bytes=self.compute_dtype_bytes,
            ),
            assumptions=self.assumptions,
        )


def trace_step(
    spec: WorkloadSpec,
    batch_size: int,
    *,
    gradient_checkpointing: bool = False,
    iterations: int = 2,
    record_ops: bool = False,
    real_tensors: bool = False,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> StepTrace:
    """Trace `iterations` train steps of `spec` at `batch_size` in this process, as one rank of
    `parallel` (`probes.parallel.one_rank`: FSDP sharded over a fake process group, DDP's
    buckets modelled); `step="eval"`: eval forwards with the training state resident
    (`probes.eval_step`).

    `record_ops` lists the ATen ops the trace ran. `real_tensors` runs the same emulated step on
    real CPU tensors instead of fake ones (it allocates every byte: for checking the fake trace
    on small models only).

    Raises `EstimateError` where the workload cannot be traced without a GPU, and the
    `ModelBuildError` of a model that cannot be built at all.
    """
    if not emulation.installed():
        raise EstimateError(
            "The CUDA emulation is not installed in this process; use estimate_peak or an EstimateSession."
        )
    if batch_size < 1:
        raise EstimateError(f"The batch size must be at least 1, got {batch_size}.")
    started = time.perf_counter()
    tracker = MemoryTracker(record_ops=record_ops)
    reads = ValueReads(spec.moe_routing, name=spec.describe())
    try:
        _run(
            spec, batch_size, gradient_checkpointing, iterations, tracker, real_tensors, parallel, reads, step
        )
    except TunerError:
        raise
    except torch.OutOfMemoryError:
        raise EstimateError(
            "The trace ran out of host memory; the estimate's fake tensors should use none, so a "
            "factory or op allocated real memory."
        ) from None
    except Exception as exc:
        raise EstimateError(_explain(spec, exc)) from None
    return StepTrace(
        batch_size=batch_size,
        gradient_checkpointing=gradient_checkpointing,
        compute_dtype_bytes=compute_dtype_bytes(spec.precision),
        log=tracker.log,
        peak_bytes=tracker.peak_bytes,
        peak_phase=tracker.peak_phase,
        peak_iteration=tracker.peak_iteration,
        peak_categories=dict(tracker.peak_categories),
        peak_by_phase=dict(tracker.peak_by_phase),
        ops=tuple(sorted(tracker.ops)) if tracker.ops is not None else (),
        seconds=time.perf_counter() - started,
        assumptions=tuple(reads.assumptions),
    )


def trace_peak(
    spec: WorkloadSpec,
    batch_size: int,
    *,
    gradient_checkpointing: bool = False,
    iterations: int = 2,
    record_ops: bool = False,
    device_model: DeviceModel = DEFAULT_DEVICE_MODEL,
    real_tensors: bool = False,
    alloc_conf: str | None = None,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> EstimateReport:
    """The estimate of `iterations` train steps (or eval steps) of `spec` at `batch_size`, traced
    in this process (see `trace_step`) and replayed through the caching allocator with `alloc_conf`."""

    def traced(size: int) -> StepTrace:
        return trace_step(
            spec,
            size,
            gradient_checkpointing=gradient_checkpointing,
            iterations=iterations,
            record_ops=record_ops,
            real_tensors=real_tensors,
            step=step,
            parallel=parallel,
        )

    trace = traced(batch_size)
    warmup = None
    # A step that cannot run at one sample (BatchNorm) has no warm-up history.
    if batch_size != WARMUP_BATCH_SIZE:
        with contextlib.suppress(EstimateError):
            warmup = traced(WARMUP_BATCH_SIZE).log
    return trace.report(device_model, parse_alloc_conf(alloc_conf), warmup=warmup)


def _run(
    spec: WorkloadSpec,
    batch_size: int,
    gradient_checkpointing: bool,
    iterations: int,
    tracker: MemoryTracker,
    real_tensors: bool,
    parallel: ParallelSetup,
    value_reads: ValueReads,
    step: StepKind = "train",
) -> None:
    from probes.parallel import one_rank
    from probes.workloads import build_workload

    # Fake CPU tensors, never fake CUDA ones: on a CPU-only build autograd aborts the process on
    # fake CUDA tensors that require grad (docs/estimate.md).
    tensors = contextlib.nullcontext() if real_tensors else FakeTensorMode(allow_non_fake_inputs=False)
    # Over the fake tensors, the reads of values they do not have (real tensors have them).
    reads = contextlib.nullcontext() if real_tensors else value_reads
    with tensors, reads, _quiet_fake_tensor_log():
        workload = build_workload(spec, device="cpu", gradient_checkpointing=gradient_checkpointing, seed=0)
        emulation.patch_transformers()  # building imported transformers where the model needs it
        if parallel == SINGLE:
            _run_steps(workload, batch_size, iterations, tracker, step=step)
            return
        # The tracker is on from the wrapping: FSDP's shards and DDP's buckets are allocated there.
        with tracker, one_rank(workload, parallel, "cpu") as rank:
            _run_steps(workload, batch_size, iterations, tracker, step=step, rank=rank)


def _run_steps(
    workload: BuiltWorkload,
    batch_size: int,
    iterations: int,
    tracker: MemoryTracker,
    *,
    step: StepKind = "train",
    rank: Rank | None = None,
) -> None:
    from probes.eval_step import prepare_training_state, run_eval_steps
    from probes.step import run_train_steps

    optimizer = workload.make_optimizer()
    model = workload.model
    tracker.classify(local_tensors(model.parameters()), "parameters")
    tracker.classify(model.buffers(), "parameters")
    handles = _attribute_gradients_and_state(model, optimizer, tracker)
    if rank is not None:
        # After the attribution hooks: a gradient is counted, then goes into its bucket.
        tracker.classify(rank.attach_buckets(), "buckets")
    # One rank's tracker is already on (from the wrapping).
    tracking = tracker if rank is None else contextlib.nullcontext()
    try:
        if step == "eval":
            # The training state, made outside the trace of a single process: the tracker counts
            # what the step left (the optimizer's state) as live from the start, as parameters
            # are. One rank's trace includes that training step (on from the wrapping), whose
            # small batch peaks below an eval batch near the card's limit.
            prepare_training_state(workload, optimizer, data_dependent=False)
            tracker.classify(_optimizer_tensors(optimizer), "optimizer_state")
            with tracking:
                run_eval_steps(
                    workload,
                    batch_size,
                    iterations=iterations,
                    on_phase=tracker.set_phase,
                    data_dependent=False,
                )
            return
        with tracking:
            run_train_steps(
                workload,
                batch_size,
                iterations=iterations,
                optimizer=optimizer,
                on_phase=tracker.set_phase,
                data_dependent=False,
            )
    finally:
        for handle in handles:
            handle.remove()
        if rank is not None:
            rank.close()


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a traceback for every op whose meta kernel refuses its inputs; the
    failure reaches the caller as an `EstimateError` anyway."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _attribute_gradients_and_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker: MemoryTracker
) -> list[Any]:
    """Hooks that move gradients and optimizer state into their categories as they appear."""
    handles: list[Any] = []

    def on_gradient(parameter: torch.Tensor) -> None:
        tracker.classify(local_tensors([parameter.grad]), "gradients")

    for parameter in model.parameters():
        if parameter.requires_grad:
            handles.append(parameter.register_post_accumulate_grad_hook(on_gradient))

    def before_step(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        # FSDP assigns its sharded gradients directly, past the accumulation hooks.
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        tracker.classify(local_tensors(grads), "gradients")

    def on_step(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        tracker.classify(_optimizer_tensors(opt), "optimizer_state")
        tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        tracker.classify(local_tensors(tensors), "optimizer_state")

    handles.append(optimizer.register_step_pre_hook(before_step))
    handles.append(optimizer.register_step_post_hook(on_step))
    return handles


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _explain(spec: WorkloadSpec, exc: Exception) -> str:
    name = spec.describe()
    where = user_location(exc)
    if isinstance(exc, _DATA_DEPENDENT) or "_local_scalar_dense" in str(exc):
        op = getattr(exc, "func", None)
        return (
            f"The {name} workload cannot be estimated without a GPU: its training step reads tensor "
            f"values at {where} ({op or 'a data-dependent op'}), which a fake-tensor trace cannot do "
            "and has no stand-in for; use the cuda backend."
        )
    if isinstance(exc, UnsupportedOperatorException):
        return (
            f"The {name} workload cannot be estimated without a GPU: it uses the op {exc.func} at {where}, "
            "which fake tensors do not support; use the cuda backend."
        )
    return f"The {name} workload cannot be estimated without a GPU: {type(exc).__name__} at {where}: {exc}"
