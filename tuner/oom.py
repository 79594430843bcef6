"""Which exceptions mean "this batch does not fit": told by type, never by message text.

Takes the torch module as an argument, so that this domain module imports no torch itself; the
probes (`probes.cuda`) and `tuner.autotune` both ask it.
"""

from __future__ import annotations

from typing import Any


def out_of_memory_types(torch: Any) -> tuple[type[BaseException], ...]:
    """`torch.cuda.OutOfMemoryError`, then `torch.OutOfMemoryError` (any device's OOM since torch
    2.5; the same class in recent torch; either may be missing in older ones)."""
    found = (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None))
    return tuple(dict.fromkeys(t for t in found if isinstance(t, type)))
