"""The search for the largest micro-batch that fits: a pure function over `fits(b) -> Trial`.

No torch here: a backend hands in `fits`, which runs one trial (real GPU steps, or an estimate)
and reports whether it ran out of memory and how many bytes it used.

Strategies:

- `guided` (docs/probe.md): a memory line `peak_reserved ≈ fixed + per_sample × b` (the
  estimator's prior, or two cheap trials at small b) predicts the largest b whose *reserved* peak
  fits `capacity_bytes`; a trial confirms it, one more trial above or below brackets it, and
  bisection runs only inside the bracket. The line is refitted after every trial from two
  measured sizes near the top (`fit_line`: the regime next to the boundary, which matters when
  memory is not linear, e.g. a checkpointing floor at small b): passes, and the smallest failure
  where its trial knows its peak (an estimate does; a GPU trial stops at the out-of-memory
  error) unless the passes below it are still on a floor. A prior that a failure refutes is
  dropped. Without a capacity it brackets by doubling.
- `doubling`: PyTorch Lightning's batch-size finder: min, 2·min, 4·min, … until a failure, then
  bisection between the last pass and the first failure.
- `backoff`: Accelerate's `find_executable_batch_size`: start at `max_batch_size`, multiply by
  0.9 (rounded down) after each failure, stop at the first pass.

The answer rule, for every strategy (it keeps the search correct when the boundary is noisy):
each size counts with the outcome of its *latest* trial, and the answer is the largest size
whose latest trial passed while no size at or below it has a latest trial that failed. So a
size that passed and then failed on a repeat is never reported, and neither is any size above a
failure.

Guided repeats a trial once when its outcome contradicts the line fitted to the *other*
passing trials, and only where it decides the answer: a failure at the bracket's top that the
line says fits (an allocator hiccup), or a pass at the answer that the line says cannot fit (a
lucky allocator state). The repeat's outcome counts. Sizes the line explains are never repeated,
so a clean device costs no extra trials; what a single process cannot see (a size that passes
here and fails in a fresh process) is the job of the probe's verification run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tuner.errors import ProbeError, SpecError
from tuner.search_types import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TRIALS,
    DEFAULT_SEARCH,
    SEGMENT_BYTES,
    STRATEGIES,
    MemoryLine,
    Move,
    SearchConfig,
    SearchResult,
    StopReason,
    Strategy,
    Trial,
)
from tuner.search_types import peak_of as _peak

__all__ = [
    "STRATEGIES",
    "FitsFn",
    "MemoryLine",
    "SearchConfig",
    "SearchResult",
    "StopReason",
    "Strategy",
    "Trial",
    "find_max_batch",
    "fit_line",
    "run_search",
]

FitsFn = Callable[[int], Trial]

BACKOFF_FACTOR = 0.9
"""Accelerate's factor: the next size after a failure is int(b × 0.9)."""
GROWTH_CAP = 16
"""Guided never jumps past 16 × the largest pass while no failure bounds it and no prior vouches for
the line: a line from two small trials can be flat (a checkpointing floor) and predict nonsense."""
LINE_RISE = 0.02
"""A memory line's two sizes differ in peak by at least 2 % of the larger, where they can."""
FIRST_AIM = 0.85
"""After the first prediction failed with nothing passed yet, aim at 85 % of the capacity: a prior
within 10 % then lands on a pass, which calibrates the line. A failure there too (anywhere the
prior puts the peak at or under 85 % of the capacity) refutes the prior: it cannot see a floor, or
is simply wrong, and guided starts over from the cheap trials, as without one."""


def find_max_batch(
    fits: FitsFn,
    *,
    strategy: Strategy = "guided",
    capacity_bytes: int | None = None,
    prior: MemoryLine | None = None,
    min_batch_size: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_trials: int = DEFAULT_MAX_TRIALS,
    tolerance: int = 0,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """The largest micro-batch in `[min_batch_size, max_batch_size]` for which `fits` passes.

    `fits(b)` runs one trial and returns a `Trial` for `b` (`ok=False` after an out-of-memory
    error). `capacity_bytes` is what the reserved peak may reach (guided predicts with it);
    `prior` is the estimator's line. The search stops when the largest pass and the smallest
    failure are adjacent (`exact`), when at most `tolerance` untried sizes lie between them
    (`tolerance`), when `max_batch_size` passes, when `min_batch_size` fails (answer 0,
    `nothing_fits`), or after `max_trials` trials. `on_trial` sees each trial as it finishes.
    The keywords are those of a `SearchConfig` (`run_search` takes one).
    """
    config = SearchConfig(
        strategy=strategy,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_trials=max_trials,
        tolerance=tolerance,
    )
    return run_search(fits, config, capacity_bytes=capacity_bytes, prior=prior, on_trial=on_trial)


def run_search(
    fits: FitsFn,
    config: SearchConfig = DEFAULT_SEARCH,
    *,
    capacity_bytes: int | None = None,
    prior: MemoryLine | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """`find_max_batch` with its settings in one `SearchConfig` (checked when it was built): what
    the layers that hand a configuration down call. `capacity_bytes` and `prior` belong to the
    device and the workload, not to the configuration."""
    if capacity_bytes is not None and capacity_bytes <= 0:
        raise SpecError(f"capacity_bytes must be positive, got {capacity_bytes}.")
    low, high, tolerance = config.min_batch_size, config.max_batch_size, config.tolerance
    log = _TrialLog(fits, on_trial, config.max_trials)
    if config.strategy == "doubling":
        stop = _doubling(log, low, high, tolerance)
    elif config.strategy == "backoff":
        stop = _backoff(log, low, high)
    else:
        usable_prior = prior if prior is not None and prior.per_sample_bytes > 0 else None
        stop = _Guided(log, capacity_bytes, usable_prior, low, high, tolerance).run()
    lo, _ = log.bracket()
    return SearchResult(
        max_batch_size=lo,
        trials=list(log.trials),
        stop_reason=stop,
        memory_line=fit_line(log.known_peaks(capacity_bytes)),
    )


def fit_line(peaks: dict[int, int]) -> MemoryLine | None:
    """The line through two sizes of `{batch_size: peak_bytes}` near the top (None with fewer
    than two): the largest, and the largest below it whose peak is at least `LINE_RISE` of the
    top's lower; without one, the smallest at or above half of the top (else the next largest).

    Sizes near the top sit in the regime next to the boundary, where the line must be right: a
    line reaching back across a bend (memory flat up to a checkpointing floor, linear after it)
    lies above the curve near the boundary and keeps predicting short of it. A rise of a few
    percent keeps the allocator's 2 MiB rounding and its fragmentation jitter from swamping the
    slope; where no size rises that much, the widest baseline in the upper half does."""
    pair = _line_sizes(peaks)
    if pair is None:
        return None
    below, top = pair
    per_sample = (peaks[top] - peaks[below]) / (top - below)
    return MemoryLine(fixed_bytes=peaks[top] - per_sample * top, per_sample_bytes=per_sample)


def _line_sizes(peaks: dict[int, int]) -> tuple[int, int] | None:
    """The two sizes `fit_line` draws its line through (smaller first)."""
    if len(peaks) < 2:
        return None
    sizes = sorted(peaks)
    top = sizes[-1]
    risen = [b for b in sizes[:-1] if peaks[top] - peaks[b] >= LINE_RISE * peaks[top]]
    upper_half = [b for b in sizes[:-1] if 2 * b >= top]
    return (risen[-1] if risen else upper_half[0] if upper_half else sizes[-2]), top


def _pinned(peaks: dict[int, int]) -> bool:
    """Whether the line through `peaks` rests on two sizes whose peaks differ by `LINE_RISE`."""
    pair = _line_sizes(peaks)
    return pair is not None and peaks[pair[1]] - peaks[pair[0]] >= LINE_RISE * peaks[pair[1]]


def _across_a_bend(peaks: dict[int, int]) -> bool:
    """Whether the line through `peaks` starts from a size on a floor: its slope is then too
    shallow, and it says that sizes past the bend fit."""
    pair = _line_sizes(peaks)
    return pair is not None and _on_floor(peaks, pair[0])


def _on_floor(peaks: dict[int, int], size: int) -> bool:
    """Whether a smaller size of `peaks` peaks within one allocator segment of `size` (memory is
    flat there: a checkpointing floor)."""
    return any(b < size and abs(peaks[b] - peaks[size]) <= SEGMENT_BYTES for b in peaks)


@dataclass
class _TrialLog:
    """Every trial run so far, and what they say under the answer rule."""

    fits: FitsFn
    on_trial: Callable[[Trial], None] | None
    max_trials: int
    trials: list[Trial] = field(default_factory=list)
    latest: dict[int, Trial] = field(default_factory=dict)
    runs: dict[int, int] = field(default_factory=dict)

    @property
    def exhausted(self) -> bool:
        return len(self.trials) >= self.max_trials

    def run(self, batch_size: int, move: Move | None = None) -> Trial:
        trial = self.fits(batch_size)
        if trial.batch_size != batch_size:
            raise ProbeError(
                f"The trial function was asked for batch size {batch_size} "
                f"but reported batch size {trial.batch_size}."
            )
        if move is not None:
            trial = replace(trial, move=move)
        self.trials.append(trial)
        self.latest[batch_size] = trial
        self.runs[batch_size] = self.runs.get(batch_size, 0) + 1
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def bracket(self) -> tuple[int, int | None]:
        """(largest accepted pass or 0, smallest size whose latest trial failed or None)."""
        failures = [b for b, t in self.latest.items() if not t.ok]
        hi = min(failures) if failures else None
        passes = [b for b, t in self.latest.items() if t.ok and (hi is None or b < hi)]
        return (max(passes) if passes else 0), hi

    def passing_peaks(self, *, excluding: int | None = None) -> dict[int, int]:
        """Reserved peak (allocated where reserved is unknown) of each size whose latest trial
        passed below the smallest failure."""
        _, hi = self.bracket()
        peaks = {}
        for b, t in self.latest.items():
            peak = _peak(t)
            if t.ok and peak is not None and b != excluding and (hi is None or b < hi):
                peaks[b] = peak
        return peaks

    def known_peaks(self, capacity: int | None, *, excluding: int | None = None) -> dict[int, int]:
        """The passing peaks, plus the smallest failure's where its trial measured one past
        `capacity`.

        A GPU trial that runs out of memory stops before its peak, but an estimate traces the
        whole step and knows how far past the capacity it went: a point on the same line, just
        above the boundary, which pins the slope where the passes below cannot (a floor). A
        failure that measured a peak within the capacity is not explained by it (noise), and
        adds nothing the passes do not say."""
        peaks = self.passing_peaks(excluding=excluding)
        _, hi = self.bracket()
        if hi is not None and hi != excluding:
            failed_peak = _peak(self.latest[hi])
            if failed_peak is not None and (capacity is None or failed_peak > capacity):
                peaks[hi] = failed_peak
        return peaks


def _closed(lo: int, hi: int | None, tolerance: int) -> StopReason | None:
    if hi is None or hi - lo - 1 > tolerance:
        return None
    return "exact" if hi - lo <= 1 else "tolerance"


def _doubling(log: _TrialLog, low: int, high: int, tolerance: int) -> StopReason:
    """Lightning's finder: double from `low` until a failure, then bisect."""
    size = low
    while not log.exhausted:
        log.run(size)
        lo, hi = log.bracket()
        if hi is not None and hi <= low:
            return "nothing_fits"
        if lo >= high:
            return "max_batch_size"
        reason = _closed(lo, hi, tolerance)
        if reason is not None:
            return reason
        size = min(2 * lo, high) if hi is None else (max(lo, low - 1) + hi) // 2
    return "max_trials"


def _backoff(log: _TrialLog, low: int, high: int) -> StopReason:
    """Accelerate's back-off: from `high`, ×0.9 (rounded down) after each failure, stop at a pass."""
    size = high
    while not log.exhausted:
        trial = log.run(size)
        if trial.ok:
            if size == high:
                return "max_batch_size"
            return "exact" if log.bracket()[1] == size + 1 else "tolerance"
        size = int(size * BACKOFF_FACTOR)
        if size < low:
            return "nothing_fits"
    return "max_trials"


class _Guided:
    """Predict from the memory line, confirm, bracket, bisect inside the bracket."""

    def __init__(
        self,
        log: _TrialLog,
        capacity: int | None,
        prior: MemoryLine | None,
        low: int,
        high: int,
        tolerance: int,
    ) -> None:
        self.log = log
        self.capacity = capacity
        self.prior = prior
        self.low = low
        self.high = high
        self.tolerance = tolerance
        self.widths: list[int] = []  # bracket width after each trial, for the bisection safeguard
        self.above_step = 1  # grows while the line keeps under-predicting with no failure above
        self.last_move: Move | None = None  # how the previous size was chosen

    def run(self) -> StopReason:
        while True:
            lo, hi = self.log.bracket()
            reason = self._stop_reason(lo, hi)
            if reason is not None:
                repeat = self._repeat_before_stopping(lo, hi)
                if repeat is None or self.log.exhausted:
                    return reason
                self.log.run(repeat, Move.CONFIRM)
                continue
            if self.log.exhausted:
                return "max_trials"
            if self._prior_refuted(lo, hi):
                self.prior = None
            size, self.last_move = self._propose(lo, hi)
            self.log.run(size, self.last_move)
            new_lo, new_hi = self.log.bracket()
            self.above_step = self.above_step * 2 if (new_lo == size and size == lo + self.above_step) else 1
            self.widths.append((new_hi if new_hi is not None else self.high + 1) - new_lo)

    def _stop_reason(self, lo: int, hi: int | None) -> StopReason | None:
        if hi is not None and hi <= self.low:
            return "nothing_fits"
        if lo >= self.high:
            return "max_batch_size"
        return _closed(lo, hi, self.tolerance)

    def _repeat_before_stopping(self, lo: int, hi: int | None) -> int | None:
        """A size whose single trial decides the answer against what the line says, or None."""
        if self.capacity is None:
            return None
        if hi is not None and self.log.runs[hi] == 1 and not _across_a_bend(self.log.passing_peaks()):
            line = self._line()
            if line is not None and line.at(hi) <= self.capacity - SEGMENT_BYTES:
                return hi  # a failure the line says fits: repeat before trusting it
        if lo > 0 and self.log.runs[lo] == 1:
            line = self._line(excluding=lo)
            if line is not None and line.at(lo) > self.capacity + SEGMENT_BYTES:
                return lo  # a pass the line says cannot fit: repeat before reporting it
        return None

    def _line(self, *, excluding: int | None = None) -> MemoryLine | None:
        """The line to trust: two measured sizes near the boundary; else the prior through the
        largest pass.

        While the two largest passes peak alike, they sit on a floor (checkpointing): a line from
        there to a failure's measured peak cuts across the bend and lies above the curve, so its
        predictions would land short, a little closer each time. The failure is left out then,
        and the search bisects until passes leave the floor. Where the sizes rose too little to
        pin a slope (under `LINE_RISE`), the prior's slope is the better guess."""
        peaks = self.log.passing_peaks(excluding=excluding)
        measured = self.log.known_peaks(self.capacity, excluding=excluding)
        used = peaks if peaks and _on_floor(peaks, max(peaks)) else measured
        fitted = fit_line(used)
        if fitted is not None and fitted.per_sample_bytes > 0 and (self.prior is None or _pinned(used)):
            return fitted
        if self.prior is not None and peaks:
            top = max(peaks)
            slope = self.prior.per_sample_bytes
            return MemoryLine(fixed_bytes=peaks[top] - slope * top, per_sample_bytes=slope)
        return None

    def _line_misleads(self, hi: int | None) -> bool:
        """Bisect regardless of the line: it keeps missing, or it just failed to confirm a top."""
        return self._bisect_now(hi) or (self.last_move is Move.ABOVE and not self.log.trials[-1].ok)

    def _prior_refuted(self, lo: int, hi: int | None) -> bool:
        """Whether the prior is refuted before the next proposal: it failed where the prior says
        15 % of the card is free (only asked where the proposal would consult the line)."""
        if self.capacity is None or self.prior is None or self._line_misleads(hi):
            return False
        return lo == 0 and hi is not None and self.prior.at(hi) <= FIRST_AIM * self.capacity

    def _propose(self, lo: int, hi: int | None) -> tuple[int, Move]:
        """The next size to try, and the move that chose it (reads the search's state, changes
        none of it)."""
        upper = hi if hi is not None else self.high + 1
        base = max(lo, self.low - 1)  # the size below the bracket: `low - 1` while nothing passed
        bisect = ((base + upper) // 2, Move.BISECT)
        if self.capacity is None:
            return self._bracketing_step(lo, hi, factor=2)
        if self._line_misleads(hi):
            return bisect  # the line misleads, or it cannot resolve single sizes here
        line = self._line()
        if line is None and lo == 0 and self.prior is not None:
            line = self.prior
        if line is None:
            if lo == 0:
                return self.low, Move.FIRST  # the first cheap trial (also after a refuted prior)
            if len(self.log.passing_peaks()) == 1 and 4 * lo < upper:
                return min(self.high, 4 * lo), Move.SECOND  # the second cheap trial pins the line
            return self._bracketing_step(lo, hi, factor=GROWTH_CAP // 2)
        aim = self.capacity * (FIRST_AIM if lo == 0 and hi is not None else 1.0)
        predicted = raw = line.largest_batch_under(aim)
        if hi is None and lo > 0 and self.prior is None:
            predicted = min(predicted, GROWTH_CAP * lo)
        predicted = min(predicted, self.high)
        if base < predicted < upper:
            return predicted, Move.PREDICT
        if predicted <= base:
            # Confirm the pass is the top: one size above, or one segment's worth of samples
            # where a sample is smaller than the allocator's rounding.
            step = max(self.above_step, math.ceil(SEGMENT_BYTES / line.per_sample_bytes))
            if step > 1 and base + step >= upper - 1:
                return bisect  # the whole bracket is within the line's resolution
            return min(base + step, upper - 1), Move.ABOVE
        if self.last_move is Move.PREDICT and raw <= upper:
            return upper - 1, Move.BELOW  # the prediction just failed: the line is likely off by one
        if hi is not None and self.log.runs[hi] == 1 and self._near_boundary_line(hi):
            return hi, Move.REPEAT  # two passes near it say the failure should fit: an allocator hiccup?
        return bisect  # the line keeps overshooting a known failure: do not trust it

    def _near_boundary_line(self, hi: int) -> bool:
        """Whether two passes in the upper half below `hi` pin a line (a floor cannot bend it)."""
        passes = self.log.passing_peaks()
        peaks = {b: p for b, p in passes.items() if 2 * b >= hi}
        line = fit_line(peaks)
        pinned = line is not None and line.per_sample_bytes > 0 and _pinned(peaks)
        return pinned and not _across_a_bend(passes)

    def _bisect_now(self, hi: int | None) -> bool:
        """Bisect when two trials in a row failed to halve a bounded bracket (the line misleads)."""
        return hi is not None and len(self.widths) >= 3 and 2 * self.widths[-1] > self.widths[-3]

    def _bracketing_step(self, lo: int, hi: int | None, *, factor: int) -> tuple[int, Move]:
        if hi is None:
            return (self.low, Move.FIRST) if lo == 0 else (min(self.high, factor * lo), Move.GROW)
        return (max(lo, self.low - 1) + hi) // 2, Move.BISECT
