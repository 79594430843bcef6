"""Plain data of the search: its configuration, a trial, a memory line, a search result. No
torch, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from tuner.errors import SpecError

DEFAULT_MAX_BATCH_SIZE = 65536
"""The largest micro-batch a search tries unless told otherwise (a plan's caller may cap it lower:
`PlanPolicy.max_micro_batch_size`)."""
DEFAULT_MAX_TRIALS = 32
"""A search's trial budget unless told otherwise."""
SEGMENT_BYTES = 2 << 20
"""The caching allocator reserves memory from the driver in whole 2 MiB segments: reserved peaks
are only known to within this, so a line cannot tell apart sizes whose peaks differ by less."""

Strategy = Literal["guided", "doubling", "backoff"]
STRATEGIES: tuple[Strategy, ...] = ("guided", "doubling", "backoff")

StopReason = Literal[
    "exact",  # the largest passing size is one below the smallest failing size
    "tolerance",  # bracket narrower than the policy's tolerance
    "max_batch_size",  # the upper limit itself fits
    "nothing_fits",  # min_batch_size does not fit
    "max_trials",  # trial budget spent before the bracket closed
]


@dataclass(frozen=True)
class SearchConfig:
    """How one search runs: its strategy, the micro-batch range it searches and when it stops.

    Built once where a caller's settings come in (a CLI flag, `autotune`'s keywords, a plan's
    `policy.max_micro_batch_size`) and handed unchanged down to `tuner.search.run_search`, so that
    every layer in between passes one checked object instead of loose keywords. Invalid settings
    are refused here, as a `SpecError`, before anything runs."""

    strategy: Strategy = "guided"
    """`guided`, `doubling` or `backoff` (`tuner.search`)."""
    min_batch_size: int = 1
    """The smallest micro-batch tried: the answer is 0 when it does not fit."""
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """The largest micro-batch tried: the answer when it fits."""
    max_trials: int = DEFAULT_MAX_TRIALS
    """The trial budget: the search stops after this many trials."""
    tolerance: int = 0
    """Stop once at most this many untried sizes lie between the largest pass and the smallest
    failure (0: find the exact boundary)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SpecError(f"Unknown search strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}.")
        if self.min_batch_size < 1:
            raise SpecError(f"min_batch_size must be at least 1, got {self.min_batch_size}.")
        if self.max_batch_size < self.min_batch_size:
            raise SpecError(
                f"max_batch_size ({self.max_batch_size}) is below min_batch_size ({self.min_batch_size})."
            )
        if self.max_trials < 1:
            raise SpecError(f"max_trials must be at least 1, got {self.max_trials}.")
        if self.tolerance < 0:
            raise SpecError(f"tolerance must not be negative, got {self.tolerance}.")


DEFAULT_SEARCH = SearchConfig()
"""The search every caller runs unless told otherwise."""


class Move(StrEnum):
    """Why the guided search ran a trial at its size (recorded in `Trial.move`)."""

    FIRST = "first"
    """The first cheap trial, at the smallest size (no line to predict with yet)."""
    SECOND = "second"
    """The second cheap trial, four times the first pass: with the first it pins the line."""
    PREDICT = "predict"
    """The memory line's prediction of the largest size that fits."""
    ABOVE = "above"
    """Just above a pass the line puts at the top: confirms that it is the top."""
    BELOW = "below"
    """One below a prediction that just failed: the line is likely off by one."""
    REPEAT = "repeat"
    """A failure the passes near it say should fit, run again (an allocator hiccup?)."""
    CONFIRM = "confirm"
    """Before stopping: the one trial that decides the answer against the line, run again."""
    BISECT = "bisect"
    """The middle of the bracket: the line misleads there, or cannot resolve single sizes."""
    GROW = "grow"
    """No failure yet and no line: a multiple of the largest pass."""


MOVE_REASONS: dict[str, str] = {
    Move.FIRST: "first cheap trial",
    Move.SECOND: "second cheap trial, pins the memory line",
    Move.PREDICT: "the memory line's prediction",
    Move.ABOVE: "just above the predicted top, to confirm it",
    Move.BELOW: "one below a failed prediction",
    Move.REPEAT: "a failure the line says fits, repeated",
    Move.CONFIRM: "repeated before trusting a result the line contradicts",
    Move.BISECT: "the middle of the bracket",
    Move.GROW: "growing from the largest pass",
}
"""How the CLI and the pages say why a trial ran."""


@dataclass(frozen=True)
class Trial:
    """One run of the train step at `batch_size`."""

    batch_size: int
    """Micro-batch size tried."""
    ok: bool
    """True when every iteration finished without running out of memory."""
    peak_allocated_bytes: int | None = None
    """Peak bytes handed out by the allocator (None after an out-of-memory error)."""
    peak_reserved_bytes: int | None = None
    """Peak bytes the caching allocator held from the driver (what actually runs out)."""
    seconds: float = 0.0
    """Wall time of the trial."""
    num_alloc_retries: int | None = None
    """cudaMalloc retries after freeing cached blocks: a sign of fragmentation near the limit."""
    samples_per_second: float | None = None
    """Throughput of the last (steady) iteration."""
    step_seconds: float | None = None
    """Wall time of the last (steady) iteration; `seconds` is the whole trial's."""
    peak_phase: str | None = None
    """forward, backward or optimizer: where the peak happened (when known)."""
    error: str | None = None
    """Why it failed: `out_of_memory`, or a message for anything else."""
    move: str | None = None
    """Why the guided search chose this size (a `Move`); None for the other strategies."""


def peak_of(trial: Trial) -> int | None:
    """A trial's peak as the search and the planner compare it: reserved (what runs out), else
    allocated, else None."""
    return trial.peak_reserved_bytes if trial.peak_reserved_bytes is not None else trial.peak_allocated_bytes


@dataclass(frozen=True)
class MemoryLine:
    """Peak bytes as a line in the micro-batch: fixed + per_sample × b."""

    fixed_bytes: float
    per_sample_bytes: float

    def at(self, batch_size: int) -> float:
        """Predicted peak at `batch_size`."""
        return self.fixed_bytes + self.per_sample_bytes * batch_size

    def largest_batch_under(self, capacity_bytes: float) -> int:
        """Largest b with `at(b) <= capacity_bytes` (0 when not even b=1 fits)."""
        if self.per_sample_bytes <= 0:
            return 0 if self.fixed_bytes > capacity_bytes else 1 << 30
        return max(0, int((capacity_bytes - self.fixed_bytes) // self.per_sample_bytes))


@dataclass(frozen=True)
class SearchResult:
    """The answer of a search and how it was reached."""

    max_batch_size: int
    """Largest size that passed (0 when not even `min_batch_size` fits)."""
    trials: list[Trial] = field(default_factory=list)
    """Every trial, in the order run."""
    stop_reason: StopReason = "exact"
    """Why the search stopped."""
    memory_line: MemoryLine | None = None
    """The line fitted to the passing trials' reserved peaks, where two or more passed."""
