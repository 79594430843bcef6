"""Plain data of the search: a trial, a memory line, a search result. No torch, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_MAX_BATCH_SIZE = 65536
"""The largest micro-batch a search tries unless told otherwise (a plan's caller may cap it lower:
`PlanPolicy.max_micro_batch_size`)."""
DEFAULT_MAX_TRIALS = 32
"""A search's trial budget unless told otherwise."""

StopReason = Literal[
    "exact",  # the largest passing size is one below the smallest failing size
    "tolerance",  # bracket narrower than the policy's tolerance
    "max_batch_size",  # the upper limit itself fits
    "nothing_fits",  # min_batch_size does not fit
    "max_trials",  # trial budget spent before the bracket closed
]


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
