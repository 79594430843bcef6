"""Live storage bytes, as a CUDA caching allocator would count them, seen from a dispatch mode.

Every tensor an op returns is looked at; a storage not seen before is counted with its size
rounded up to the allocator's 512-byte granularity, and a weakref finalizer uncounts it when it
dies. Views share a storage and count once. The same code runs on fake and real tensors, which
is what lets the tests compare the two.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from probes.estimate.allocator import AllocationLog

ALLOCATION_GRANULARITY = 512
"""CUDA's caching allocator rounds every block up to a multiple of 512 bytes."""

CATEGORIES = ("parameters", "gradients", "buckets", "optimizer_state", "activations")
"""Where live bytes are attributed; anything not a parameter, gradient, DDP gradient bucket or
optimizer state (activations saved for backward, temporaries, the batch, FSDP's gathered
parameters) counts as activations."""


def rounded(nbytes: int) -> int:
    """Bytes the allocator hands out for a request of `nbytes`."""
    return -(-nbytes // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY


class MemoryTracker(TorchDispatchMode):  # type: ignore[misc]
    """Tracks live and peak storage bytes of every op run while the mode is active.

    `phase` is set by the caller (forward, backward, optimizer); the peak remembers the phase
    and iteration it happened in and the bytes per category at that moment.
    """

    def __init__(self, *, record_ops: bool = False) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, str, int]] = {}
        self.log = AllocationLog()
        """Every storage's allocation (its exact bytes) and free, in order."""
        self._storages_seen = 0
        self._finalized: set[int] = set()
        """Storages with a finalizer already (one each, however often resized)."""
        self._by_category: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase = "setup"
        self.iteration = 0
        self.peak_phase = "setup"
        self.peak_iteration = 0
        self.peak_categories: dict[str, int] = dict(self._by_category)
        self.peak_by_phase: dict[str, int] = {}
        self.ops: Counter[str] | None = Counter() if record_ops else None

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        output = func(*args, **(kwargs or {}))
        if self.ops is not None:
            self.ops[str(func.overloadpacket.__name__)] += 1
        for value in tree_leaves(output):
            if isinstance(value, torch.Tensor):
                self._count(value, "activations")
        return output

    def __enter__(self) -> Any:
        # FSDP frees and re-allocates its unsharded parameters by resizing their storages, past
        # the dispatcher: seen here, a resize to nothing is a free and a resize from nothing an
        # allocation, as the caching allocator sees them.
        self._resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: Any, size: int) -> Any:
            result = tracker._resize(storage, size)
            tracker._resized(storage, int(size))
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> Any:
        torch.UntypedStorage.resize_ = self._resize
        # What the log holds after this (the model and optimizer dying) is not part of the step.
        self.log.end = len(self.log)
        return super().__exit__(*exc_info)

    def _resized(self, storage: Any, nbytes: int) -> None:
        key = id(storage)
        known = self._live.get(key)
        if known is not None:
            if rounded(nbytes) == known[0]:
                return
            self._release(key)
        if nbytes > 0:
            self._add(key, storage, nbytes, known[1] if known is not None else "activations")

    def set_phase(self, phase: str, iteration: int) -> None:
        """Attribute what happens from now on to `phase` of `iteration`."""
        if phase == "forward" and len(self.log.iteration_starts) <= iteration:
            self.log.iteration_starts.append(len(self.log))
        self.phase = phase
        self.iteration = iteration

    def classify(self, tensors: Iterable[torch.Tensor | None], category: str) -> None:
        """Count `tensors` under `category`: new ones are added (tensors made before the mode
        started, such as parameters), known ones move from their old category (except DDP's
        buckets, which stay buckets when gradients become views into them)."""
        for tensor in tensors:
            if tensor is None:
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            known = self._live.get(key)
            if known is None:
                self._count(tensor, category)
            elif known[1] != category and known[1] != "buckets":
                nbytes, old, number = known
                self._by_category[old] -= nbytes
                self._by_category[category] += nbytes
                self._live[key] = (nbytes, category, number)

    def _count(self, tensor: torch.Tensor, category: str) -> None:
        if is_traceable_wrapper_subclass(tensor):
            # A DTensor (FSDP's parameters, gradients, optimizer state) holds no memory of its
            # own: its local shard, made by an op of its own, is what is counted.
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        exact = storage.nbytes()
        if exact == 0:
            return  # CUDA hands out no block for an empty storage
        self._add(key, storage, exact, category)

    def _add(self, key: int, storage: Any, exact: int, category: str) -> None:
        nbytes = rounded(exact)
        number = self._storages_seen
        self._storages_seen += 1
        self._live[key] = (nbytes, category, number)
        self.log.allocate(number, exact)
        if key not in self._finalized:
            self._finalized.add(key)
            weakref.finalize(storage, self._forget, key)
        self._by_category[category] += nbytes
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_by_phase.get(self.phase, 0):
            self.peak_by_phase[self.phase] = self.live_bytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_phase = self.phase
            self.peak_iteration = self.iteration
            self.peak_categories = dict(self._by_category)

    def _forget(self, key: int) -> None:
        self._finalized.discard(key)
        self._release(key)

    def _release(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]
            self._by_category[entry[1]] -= entry[0]
            self.log.free(entry[2])
