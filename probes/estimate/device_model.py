"""From traced bytes to what a GPU runs out of: usable bytes of a card, predicted reserved bytes.

The trace counts the bytes the caching allocator hands out. A real card runs out earlier:

- the CUDA context, cuBLAS/cuDNN handles and loaded kernels take memory outside the allocator
  (`context_overhead_bytes`; DESIGN.md §5 measured 0.5–0.8 GiB on an H100, the upper end is kept);
- libraries allocate through the allocator what the trace never sees (cuBLAS/cuBLASLt
  workspaces, fused-attention scratch), a near-constant 60–100 MiB on an H100 (DESIGN.md §5),
  `untracked_allocated_bytes` takes the middle;
- the allocator reserves more than it hands out (block rounding, fragmentation): 2–35 % above
  allocated on an H100 (DESIGN.md §3), worst with gradient checkpointing, whose recomputation
  interleaves short- and long-lived blocks. At the true largest batch, allocated was 86–99 % of
  the card (DESIGN.md §3), so the allowance is 1.05 without and 1.15 with checkpointing.

These are the documented defaults, not yet fitted on this project's own GPU runs: `calibrate`
refits them from measured (traced, allocated, reserved) triples whenever a GPU is available
(bench/estimate_accuracy.py prints them).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace

MIB = 1 << 20
GIB = 1 << 30
SEGMENT_BYTES = 2 * MIB
"""The caching allocator reserves memory from the driver in multiples of 2 MiB."""


@dataclass(frozen=True)
class Measurement:
    """One real GPU trial next to its estimate."""

    traced_peak_bytes: int
    """The estimate's traced peak at this batch size."""
    max_allocated_bytes: int
    """`torch.cuda.max_memory_allocated` of the real trial."""
    max_reserved_bytes: int
    """`torch.cuda.max_memory_reserved` of the real trial."""
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class DeviceModel:
    """Constants that turn a traced peak into a fit verdict on a card."""

    context_overhead_bytes: int = 800 * MIB
    """Card memory outside the allocator: CUDA context, library handles, kernels."""
    untracked_allocated_bytes: int = 80 * MIB
    """Allocator memory the trace does not see (library workspaces)."""
    fragmentation: float = 1.05
    """Peak reserved / peak allocated without gradient checkpointing."""
    fragmentation_checkpointing: float = 1.15
    """Peak reserved / peak allocated with gradient checkpointing."""

    def usable_bytes(self, total_memory_bytes: int) -> int:
        """What the allocator can reserve on a card of `total_memory_bytes`."""
        return max(0, total_memory_bytes - self.context_overhead_bytes)

    def allocated_bytes(self, traced_peak_bytes: int) -> int:
        """Predicted `max_memory_allocated` from a traced peak."""
        return traced_peak_bytes + self.untracked_allocated_bytes

    def reserved_bytes(self, allocated_bytes: int, *, gradient_checkpointing: bool) -> int:
        """Predicted peak reserved bytes, whole 2 MiB segments."""
        factor = self.fragmentation_checkpointing if gradient_checkpointing else self.fragmentation
        return math.ceil(allocated_bytes * factor / SEGMENT_BYTES) * SEGMENT_BYTES

    def fits(self, reserved_bytes: int, total_memory_bytes: int, *, memory_margin: float = 0.0) -> bool:
        """The trial verdict: the predicted reserved peak fits the usable memory less the margin."""
        return reserved_bytes <= self.usable_bytes(total_memory_bytes) * (1.0 - memory_margin)


DEFAULT_DEVICE_MODEL = DeviceModel()


def calibrate(measurements: Iterable[Measurement], base: DeviceModel = DEFAULT_DEVICE_MODEL) -> DeviceModel:
    """Refit the allocator constants from real trials: the untracked bytes as the median gap
    between real and traced allocated bytes (never below zero), and each fragmentation allowance
    as the largest reserved/allocated ratio seen (the verdict must not let a real OOM through).
    Constants without measurements keep `base`'s values; the context overhead is a property of
    the card and driver, measured separately (`torch.cuda.mem_get_info` against reserved)."""
    items = list(measurements)
    if not items:
        return base
    gaps = [m.max_allocated_bytes - m.traced_peak_bytes for m in items]
    untracked = max(0, int(statistics.median(gaps)))
    model = replace(base, untracked_allocated_bytes=untracked)
    plain = [m.max_reserved_bytes / m.max_allocated_bytes for m in items if not m.gradient_checkpointing]
    ckpt = [m.max_reserved_bytes / m.max_allocated_bytes for m in items if m.gradient_checkpointing]
    if plain:
        model = replace(model, fragmentation=max(1.0, *plain))
    if ckpt:
        model = replace(model, fragmentation_checkpointing=max(1.0, *ckpt))
    return model
