"""Many estimates in one process: the emulation installed once, traces remembered.

The functions here run inside a process made for estimating (a child of `run_in_child`): they
install the CUDA emulation in the process that calls them. The probe orchestrator runs
`estimate_fits` or `search_max_batch` in such a child; `probes.estimate.remote` does that for a
caller in any process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from probes.estimate import emulation
from probes.estimate.allocator import AllocationLog, smallest_passing_capacity
from probes.estimate.calibration import TracedTrial
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, DeviceModel
from probes.estimate.report import EstimateReport
from probes.estimate.trace import WARMUP_BATCH_SIZE, StepTrace, trace_step
from tuner.alloc_conf import canonical_alloc_conf, parse_alloc_conf
from tuner.errors import EstimateError, SpecError
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.search import fit_line, run_search
from tuner.search_types import (
    DEFAULT_SEARCH,
    SEGMENT_BYTES,
    MemoryLine,
    SearchConfig,
    SearchResult,
    Trial,
)
from tuner.spec import StepKind, WorkloadSpec

LINE_BATCH_SIZES = (1, 2, 4)
"""Where the prior line is traced: small enough to be quick, two points past b=1's quirks."""


class EstimateSession:
    """Installs the emulation in this process once, then answers many estimates.

    Each (workload, batch size, checkpointing) is traced once; the allocator replay that turns a
    trace into reserved bytes and a verdict is cheap and runs per allocator setting and card, so
    a search that asks again (the prior's points, a confirming trial) costs no new trace.
    """

    def __init__(self, *, device_model: DeviceModel = DEFAULT_DEVICE_MODEL) -> None:
        emulation.install_cuda_emulation()
        self.device_model = device_model
        self._traces: dict[tuple[str, int, bool, StepKind, str], StepTrace] = {}
        self._reports: dict[tuple[str, int, bool, str | None, StepKind, str], EstimateReport] = {}
        self._needed: dict[tuple[str, int, bool, str | None, StepKind, str], int] = {}
        self.notes: dict[str, list[str]] = {}
        """What a probe's result should say about these traces: `estimate_assumptions`, the
        assumptions made for values the traces could not read (filled in as they are traced)."""

    def step_trace(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        *,
        gradient_checkpointing: bool,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> StepTrace:
        """The traced step of `spec` at `batch_size` (traced at most once per session)."""
        key = (spec.fingerprint(), batch_size, gradient_checkpointing, step, parallel.probe_key)
        if key not in self._traces:
            self._traces[key] = trace_step(
                spec, batch_size, gradient_checkpointing=gradient_checkpointing, step=step, parallel=parallel
            )
            stated = self.notes.setdefault("estimate_assumptions", [])
            stated.extend(a for a in self._traces[key].assumptions if a not in stated)
            if not stated:
                del self.notes["estimate_assumptions"]
        return self._traces[key]

    def _warmup(
        self,
        spec: WorkloadSpec,
        gradient_checkpointing: bool,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> AllocationLog | None:
        """The warm-up step's log; None where that step cannot run (BatchNorm of one sample)."""
        try:
            trace = self.step_trace(
                spec,
                WARMUP_BATCH_SIZE,
                gradient_checkpointing=gradient_checkpointing,
                step=step,
                parallel=parallel,
            )
        except EstimateError:
            return None
        return trace.log

    def trace(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        *,
        gradient_checkpointing: bool = False,
        alloc_conf: str | None = None,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> EstimateReport:
        """The estimate of `spec` at `batch_size` with the allocator setting `alloc_conf`."""
        conf = canonical_alloc_conf(alloc_conf)
        key = (spec.fingerprint(), batch_size, gradient_checkpointing, conf, step, parallel.probe_key)
        if key not in self._reports:
            traced = self.step_trace(
                spec, batch_size, gradient_checkpointing=gradient_checkpointing, step=step, parallel=parallel
            )
            warmup = self._warmup(spec, gradient_checkpointing, step, parallel)
            report = traced.report(self.device_model, parse_alloc_conf(conf), warmup=warmup)
            self._reports[key] = replace(report, alloc_conf=conf)
        return self._reports[key]

    def needed_bytes(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        *,
        gradient_checkpointing: bool = False,
        alloc_conf: str | None = None,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> int:
        """The smallest allocator capacity on which the step fits (both histories, slack kept out),
        to about 0.4 %: the boundary itself, which a search line and a memory budget compare with.
        Between the peak allocated bytes (below which nothing fits) and the peak reserved bytes
        of an unbounded card (where the allocator never has to return a cached segment)."""
        conf = canonical_alloc_conf(alloc_conf)
        key = (spec.fingerprint(), batch_size, gradient_checkpointing, conf, step, parallel.probe_key)
        if key not in self._needed:
            report = self.trace(
                spec,
                batch_size,
                gradient_checkpointing=gradient_checkpointing,
                alloc_conf=conf,
                step=step,
                parallel=parallel,
            )
            fits = self._verdict(spec, batch_size, gradient_checkpointing, conf, step, parallel)
            precision = max(SEGMENT_BYTES, report.peak_reserved_bytes // 256)
            self._needed[key] = smallest_passing_capacity(
                fits, report.peak_allocated_bytes - 1, report.peak_reserved_bytes, precision=precision
            )
        return self._needed[key]

    def _verdict(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        gradient_checkpointing: bool,
        alloc_conf: str | None,
        kind: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> Callable[[int], bool]:
        step = self.step_trace(
            spec, batch_size, gradient_checkpointing=gradient_checkpointing, step=kind, parallel=parallel
        )
        settings = parse_alloc_conf(alloc_conf)
        warmup = self._warmup(spec, gradient_checkpointing, kind, parallel)

        def fits(capacity: int) -> bool:
            stats = self.device_model.replay(
                step.log,
                settings,
                capacity_bytes=capacity,
                activation_bytes=step.peak_categories.get("activations", 0),
                gradient_checkpointing=gradient_checkpointing,
                compute_dtype_bytes=step.compute_dtype_bytes,
                warmup=warmup,
            )
            return not stats.out_of_memory

        return fits

    def trial(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        device_total_bytes: int,
        *,
        gradient_checkpointing: bool = False,
        memory_margin: float = 0.0,
        alloc_conf: str | None = None,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> Trial:
        """One search trial: the step replayed through the caching allocator on the card's usable
        memory less the margin passes when no request runs out of it (the allocator's own retry,
        after returning cached segments, included). Its reserved peak is the capacity the step
        needs (`needed_bytes`), passing or not, so that a search's line and the card's capacity
        measure the same thing; its allocated peak is the unbounded replay's."""
        kind = step
        traced = self.step_trace(
            spec, batch_size, gradient_checkpointing=gradient_checkpointing, step=kind, parallel=parallel
        )
        capacity = self.capacity_bytes(device_total_bytes, memory_margin)
        ok = self._verdict(spec, batch_size, gradient_checkpointing, alloc_conf, kind, parallel)(capacity)
        report = self.trace(
            spec,
            batch_size,
            gradient_checkpointing=gradient_checkpointing,
            alloc_conf=alloc_conf,
            step=kind,
            parallel=parallel,
        )
        needed = self.needed_bytes(
            spec,
            batch_size,
            gradient_checkpointing=gradient_checkpointing,
            alloc_conf=alloc_conf,
            step=kind,
            parallel=parallel,
        )
        return Trial(
            batch_size=batch_size,
            ok=ok,
            peak_allocated_bytes=report.peak_allocated_bytes,
            peak_reserved_bytes=min(needed, capacity) if ok else max(needed, capacity + 1),
            seconds=traced.seconds,
            peak_phase=traced.peak_phase,
            error=None if ok else "out_of_memory",
        )

    def line(
        self,
        spec: WorkloadSpec,
        *,
        gradient_checkpointing: bool = False,
        batch_sizes: tuple[int, ...] = LINE_BATCH_SIZES,
        alloc_conf: str | None = None,
        step: StepKind = "train",
        parallel: ParallelSetup = SINGLE,
    ) -> MemoryLine:
        """The capacity a step needs (`needed_bytes`) as fixed + per_sample × b, through the two
        largest of `batch_sizes`."""
        if len(set(batch_sizes)) < 2:
            raise SpecError("A memory line needs at least two different batch sizes.")
        peaks = {
            b: self.needed_bytes(
                spec,
                b,
                gradient_checkpointing=gradient_checkpointing,
                alloc_conf=alloc_conf,
                step=step,
                parallel=parallel,
            )
            for b in sorted(set(batch_sizes))
        }
        line = fit_line(peaks)
        assert line is not None  # two or more points
        return line

    def capacity_bytes(self, device_total_bytes: int, memory_margin: float = 0.0) -> int:
        """Bytes the allocator may reserve on this card, less the margin."""
        return int(self.device_model.usable_bytes(device_total_bytes) * (1.0 - memory_margin))


_SESSION: EstimateSession | None = None


def current_session() -> EstimateSession:
    """This process's session (created, and the emulation installed, on first use)."""
    global _SESSION
    if _SESSION is None:
        _SESSION = EstimateSession()
    return _SESSION


def estimate_fits(
    spec: WorkloadSpec,
    device_total_bytes: int,
    *,
    gradient_checkpointing: bool,
    memory_margin: float = 0.0,
    alloc_conf: str | None = None,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> Callable[[int], Trial]:
    """`fits(b) -> Trial` of the estimate backend, for `tuner.search.find_max_batch`, with the
    allocator setting `alloc_conf`. Installs the emulation in this process: call it in a child
    process."""
    session = current_session()

    def fits(batch_size: int) -> Trial:
        return session.trial(
            spec,
            batch_size,
            device_total_bytes,
            gradient_checkpointing=gradient_checkpointing,
            memory_margin=memory_margin,
            alloc_conf=alloc_conf,
            step=step,
            parallel=parallel,
        )

    return fits


def estimate_line(
    spec: WorkloadSpec,
    *,
    gradient_checkpointing: bool,
    batch_sizes: tuple[int, ...] = LINE_BATCH_SIZES,
    alloc_conf: str | None = None,
    step: StepKind = "train",
    parallel: ParallelSetup = SINGLE,
) -> MemoryLine:
    """The prior for a guided CUDA search: peak reserved ≈ fixed + per_sample × b. Installs the
    emulation in this process: call it in a child process."""
    return current_session().line(
        spec,
        gradient_checkpointing=gradient_checkpointing,
        batch_sizes=batch_sizes,
        alloc_conf=alloc_conf,
        step=step,
        parallel=parallel,
    )


def search_max_batch(
    spec: WorkloadSpec,
    device_total_bytes: int,
    *,
    gradient_checkpointing: bool,
    memory_margin: float = 0.0,
    search: SearchConfig = DEFAULT_SEARCH,
    on_trial: Callable[[Trial], None] | None = None,
    alloc_conf: str | None = None,
    parallel: ParallelSetup = SINGLE,
) -> SearchResult:
    """The largest micro-batch whose step fits the card less the margin in the allocator replay,
    found by `tuner.search.run_search` (as `search` says) over estimates (guided: the line through b = 2 and 4
    is the prior; the search confirms, brackets, and bisects where the line does not hold).
    Installs the emulation in this process: call it in a child process."""
    session = current_session()
    prior = (
        session.line(
            spec, gradient_checkpointing=gradient_checkpointing, alloc_conf=alloc_conf, parallel=parallel
        )
        if search.strategy == "guided"
        else None
    )
    fits = estimate_fits(
        spec,
        device_total_bytes,
        gradient_checkpointing=gradient_checkpointing,
        memory_margin=memory_margin,
        alloc_conf=alloc_conf,
        parallel=parallel,
    )
    return run_search(
        fits,
        search,
        capacity_bytes=session.capacity_bytes(device_total_bytes, memory_margin),
        prior=prior,
        on_trial=on_trial,
    )


def calibration_tracer(
    session: EstimateSession | None = None,
) -> Callable[[WorkloadSpec, int, bool], TracedTrial]:
    """The tracer `probes.estimate.calibration.calibrate` replays: this session's traces."""
    active = session or current_session()

    def trace(spec: WorkloadSpec, batch_size: int, gradient_checkpointing: bool) -> TracedTrial:
        step = active.step_trace(spec, batch_size, gradient_checkpointing=gradient_checkpointing)
        return TracedTrial(
            log=step.log,
            activation_bytes=step.peak_categories.get("activations", 0),
            traced_peak_bytes=step.peak_bytes,
        )

    return trace
