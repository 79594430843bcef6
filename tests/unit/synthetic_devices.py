"""Synthetic devices: memory models with the shapes real GPUs showed (docs/gpu_memory.md), as
`fits(b) -> Trial` callables, so that search strategies can be compared and tested exactly.

Each device knows its true maximum by scanning its own model, never from a search.
Used by `tests/unit/test_search.py` and by `bench/probe_strategies.py --synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tuner.search_types import MemoryLine, Trial

GiB = 1 << 30
MiB = 1 << 20
_BLOCK = 2 * MiB  # the caching allocator rounds large segments up to 2 MiB

Noise = Literal["none", "hiccup", "lucky"]


@dataclass
class SyntheticDevice:
    """Peak allocated = max(floor, fixed + per_sample × b); reserved = allocated × (1 + frag) +
    frag_fixed, rounded up to 2 MiB; a trial fails when reserved exceeds `capacity`.

    Noise, near the true maximum M:
    - `hiccup`: sizes M−1 and M fail on their first trial (allocator history) and pass after.
    - `lucky`: size M+1 passes its first trial (a lucky allocator state, reporting a reserved peak
      just under the capacity) and fails on every later one, in any process.
    """

    name: str
    capacity: int
    fixed: int
    per_sample: int
    frag: float = 0.05
    frag_fixed: int = 64 * MiB
    floor: int = 0
    noise: Noise = "none"
    max_batch_size: int = 65536
    seconds_fixed: float = 1.0
    """Wall time of one trial: fixed part (model build, two steps' overhead)."""
    seconds_per_sample: float = 0.02
    failed_peaks: bool = False
    """Whether a failed trial still reports its peaks, as the estimate backend's traces do (a GPU
    trial stops at the out-of-memory error and reports none)."""
    runs: dict[int, int] = field(default_factory=dict)

    def allocated(self, batch_size: int) -> int:
        return max(self.floor, self.fixed + self.per_sample * batch_size)

    def reserved(self, batch_size: int) -> int:
        raw = self.allocated(batch_size) * (1 + self.frag) + self.frag_fixed
        return int(-(-raw // _BLOCK) * _BLOCK)

    @property
    def true_max(self) -> int:
        """Largest b whose reserved peak fits (monotone, so a bisection over the model itself)."""
        lo, hi = 0, self.max_batch_size + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.reserved(mid) <= self.capacity else (lo, mid)
        return lo

    def prior(self, error: float = 0.0) -> MemoryLine:
        """A prior for the reserved peak's linear part, off by `error` (0.1 = 10 % high) on both
        terms (the estimator's line plus its fragmentation allowance; it cannot see a floor)."""
        return MemoryLine(
            fixed_bytes=(self.fixed * (1 + self.frag) + self.frag_fixed) * (1 + error),
            per_sample_bytes=self.per_sample * (1 + self.frag) * (1 + error),
        )

    def seconds(self, batch_size: int, ok: bool) -> float:
        # An out-of-memory trial stops at its peak, about half-way through its steps.
        full = self.seconds_fixed + self.seconds_per_sample * batch_size
        return full if ok else full / 2

    def fits(self, batch_size: int) -> Trial:
        run = self.runs.get(batch_size, 0)
        self.runs[batch_size] = run + 1
        reserved = self.reserved(batch_size)
        ok = reserved <= self.capacity
        top = self.true_max
        if self.noise == "hiccup" and top - 1 <= batch_size <= top and run == 0:
            ok = False
        if self.noise == "lucky" and batch_size == top + 1:
            ok = run == 0
            reserved = min(reserved, self.capacity - MiB)
        if not ok:
            return Trial(
                batch_size=batch_size,
                ok=False,
                peak_allocated_bytes=self.allocated(batch_size) if self.failed_peaks else None,
                peak_reserved_bytes=reserved if self.failed_peaks else None,
                seconds=self.seconds(batch_size, False),
                error="out_of_memory",
            )
        return Trial(
            batch_size=batch_size,
            ok=True,
            peak_allocated_bytes=self.allocated(batch_size),
            peak_reserved_bytes=reserved,
            seconds=self.seconds(batch_size, True),
            num_alloc_retries=0,
        )

    def fresh(self) -> SyntheticDevice:
        """The same device with no trial history (a fresh process)."""
        return SyntheticDevice(**{k: v for k, v in self.__dict__.items() if k != "runs"})


def table() -> list[SyntheticDevice]:
    """The devices every strategy is measured on: shapes seen on an H100 80GB and some edges."""
    h100 = 79 * GiB
    return [
        SyntheticDevice("gpt2-like linear", h100, fixed=3 * GiB, per_sample=1400 * MiB),
        SyntheticDevice("llama-1b-like linear", h100, fixed=18 * GiB, per_sample=2600 * MiB, frag=0.12),
        SyntheticDevice("cnn-like many samples", h100, fixed=900 * MiB, per_sample=37 * MiB, frag=0.03),
        SyntheticDevice("high fragmentation", h100, fixed=6 * GiB, per_sample=700 * MiB, frag=0.35),
        SyntheticDevice(
            "checkpointing floor", h100, fixed=14 * GiB, per_sample=330 * MiB, floor=22 * GiB, frag=0.2
        ),
        SyntheticDevice("small card", 15 * GiB, fixed=2 * GiB, per_sample=900 * MiB),
        SyntheticDevice("noisy: hiccup", h100, fixed=3 * GiB, per_sample=1400 * MiB, noise="hiccup"),
        SyntheticDevice("noisy: lucky", h100, fixed=3 * GiB, per_sample=1400 * MiB, noise="lucky"),
        SyntheticDevice("nothing fits", 8 * GiB, fixed=9 * GiB, per_sample=500 * MiB),
        SyntheticDevice("everything fits", h100, fixed=1 * GiB, per_sample=1 * MiB, max_batch_size=4096),
    ]


DEVICES_BY_NAME = {device.name: device for device in table()}
"""The table by name (each use should take `.fresh()` copies)."""
