"""Many estimates in one process: the emulation installed once, traces remembered.

The functions here run inside a process made for estimating (a child of `run_in_child`): they
install the CUDA emulation in the process that calls them. The probe orchestrator runs
`estimate_fits` or `search_max_batch` in such a child; `probes.estimate.remote` does that for a
caller in any process.
"""

from __future__ import annotations

from collections.abc import Callable

from probes.estimate import emulation
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, DeviceModel
from probes.estimate.report import EstimateReport
from probes.estimate.trace import trace_peak
from tuner.errors import SpecError
from tuner.search import Strategy, find_max_batch, fit_line
from tuner.search_types import MemoryLine, SearchResult, Trial
from tuner.spec import WorkloadSpec

LINE_BATCH_SIZES = (1, 2, 4)
"""Where the prior line is traced: small enough to be quick, two points past b=1's quirks."""


class EstimateSession:
    """Installs the emulation in this process once, then answers many traces.

    Each (workload, batch size, checkpointing) is traced once; a search that asks again (the
    prior's points, a confirming trial) gets the remembered report.
    """

    def __init__(self, *, device_model: DeviceModel = DEFAULT_DEVICE_MODEL) -> None:
        emulation.install_cuda_emulation()
        self.device_model = device_model
        self._reports: dict[tuple[str, int, bool], EstimateReport] = {}

    def trace(
        self, spec: WorkloadSpec, batch_size: int, *, gradient_checkpointing: bool = False
    ) -> EstimateReport:
        """The estimate of `spec` at `batch_size` (traced at most once per session)."""
        key = (spec.fingerprint(), batch_size, gradient_checkpointing)
        if key not in self._reports:
            self._reports[key] = trace_peak(
                spec,
                batch_size,
                gradient_checkpointing=gradient_checkpointing,
                device_model=self.device_model,
            )
        return self._reports[key]

    def trial(
        self,
        spec: WorkloadSpec,
        batch_size: int,
        device_total_bytes: int,
        *,
        gradient_checkpointing: bool = False,
        memory_margin: float = 0.0,
    ) -> Trial:
        """One search trial: passes when the predicted reserved peak fits the card's usable
        memory less the margin."""
        report = self.trace(spec, batch_size, gradient_checkpointing=gradient_checkpointing)
        ok = self.device_model.fits(
            report.peak_reserved_bytes, device_total_bytes, memory_margin=memory_margin
        )
        return Trial(
            batch_size=batch_size,
            ok=ok,
            peak_allocated_bytes=report.peak_allocated_bytes,
            peak_reserved_bytes=report.peak_reserved_bytes,
            seconds=report.seconds,
            peak_phase=report.peak_phase,
            error=None if ok else "out_of_memory",
        )

    def line(
        self,
        spec: WorkloadSpec,
        *,
        gradient_checkpointing: bool = False,
        batch_sizes: tuple[int, ...] = LINE_BATCH_SIZES,
    ) -> MemoryLine:
        """Predicted peak reserved bytes as fixed + per_sample × b, through the two largest of
        `batch_sizes`."""
        if len(set(batch_sizes)) < 2:
            raise SpecError("A memory line needs at least two different batch sizes.")
        peaks = {
            b: self.trace(spec, b, gradient_checkpointing=gradient_checkpointing).peak_reserved_bytes
            for b in sorted(set(batch_sizes))
        }
        line = fit_line(peaks)
        assert line is not None  # two or more points
        return line

    def capacity_bytes(self, device_total_bytes: int, memory_margin: float = 0.0) -> int:
        """Reserved bytes a trial may reach on this card."""
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
) -> Callable[[int], Trial]:
    """`fits(b) -> Trial` of the estimate backend, for `tuner.search.find_max_batch`. Installs the
    emulation in this process: call it in a child process."""
    session = current_session()

    def fits(batch_size: int) -> Trial:
        return session.trial(
            spec,
            batch_size,
            device_total_bytes,
            gradient_checkpointing=gradient_checkpointing,
            memory_margin=memory_margin,
        )

    return fits


def estimate_line(
    spec: WorkloadSpec,
    *,
    gradient_checkpointing: bool,
    batch_sizes: tuple[int, ...] = LINE_BATCH_SIZES,
) -> MemoryLine:
    """The prior for a guided CUDA search: peak reserved ≈ fixed + per_sample × b. Installs the
    emulation in this process: call it in a child process."""
    return current_session().line(
        spec, gradient_checkpointing=gradient_checkpointing, batch_sizes=batch_sizes
    )


def search_max_batch(
    spec: WorkloadSpec,
    device_total_bytes: int,
    *,
    gradient_checkpointing: bool,
    memory_margin: float = 0.0,
    strategy: Strategy = "guided",
    max_batch_size: int = 65536,
    max_trials: int = 32,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """The largest micro-batch whose predicted reserved peak fits the card less the margin,
    found by `tuner.search.find_max_batch` over estimates (guided: the line through b = 2 and 4
    is the prior; the search confirms, brackets, and bisects where the line does not hold).
    Installs the emulation in this process: call it in a child process."""
    session = current_session()
    prior = (
        session.line(spec, gradient_checkpointing=gradient_checkpointing) if strategy == "guided" else None
    )
    fits = estimate_fits(
        spec, device_total_bytes, gradient_checkpointing=gradient_checkpointing, memory_margin=memory_margin
    )
    return find_max_batch(
        fits,
        strategy=strategy,
        capacity_bytes=session.capacity_bytes(device_total_bytes, memory_margin),
        prior=prior,
        max_batch_size=max_batch_size,
        max_trials=max_trials,
        on_trial=on_trial,
    )
