"""A model of PyTorch's CUDA caching allocator, replayed over a trace's allocations and frees.

The trace counts live bytes; a card runs out of *reserved* bytes, the segments the caching
allocator took from the driver. This module follows `c10/cuda/CUDACachingAllocator.cpp` closely
enough to turn an ordered stream of (allocate n bytes, free that block) into the allocator's
reserved and allocated bytes, and into its verdict on a card of a given capacity:

- requests round up to 512 bytes (or to a power-of-two division, `roundup_power2_divisions`);
- two pools: small (≤ 1 MiB, carved from 2 MiB segments) and large; a large request of under
  10 MiB takes a 20 MiB segment, a larger one a segment of its own size rounded to 2 MiB;
- a request takes the best-fitting free block of its pool (smallest size, then lowest address)
  and splits it when the rest is worth keeping (≥ 512 bytes in the small pool, > 1 MiB in the
  large one); a freed block merges with its free neighbours *within its segment* only, so a
  segment whose blocks are partly in use strands its free part for larger requests;
- when a new segment does not fit the card, every free segment that is wholly free is returned
  to the driver and the request retried once (`num_alloc_retries`); only then is it out of memory;
- `expandable_segments:True`: one segment per pool that grows by mapping pages (2 MiB small,
  20 MiB large) at its lowest free address, so neighbours merge and only whole free pages are
  given back on a retry.

Not modelled: several streams (training runs on one), CUDA graphs' private pools, and
`garbage_collection_threshold`, which acts only under a per-process memory fraction.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tuner.alloc_conf import AllocatorSettings

MIN_BLOCK_SIZE = 512
"""Every request is rounded up to at least this many bytes."""
SMALL_SIZE = 1 << 20
"""The largest request of the small pool (1 MiB)."""
SMALL_BUFFER = 2 << 20
"""Small requests are packed into 2 MiB segments (and pages, for expandable segments)."""
MIN_LARGE_ALLOC = 10 << 20
"""Large requests under 10 MiB share a 20 MiB segment."""
LARGE_BUFFER = 20 << 20
"""The shared segment of large requests under 10 MiB, and the page of an expandable large pool."""
ROUND_LARGE = 2 << 20
"""Larger requests get a segment of their own, rounded up to 2 MiB."""
_ADDRESS_SPACE = 1 << 46
"""Virtual address space of one expandable segment: far more than any card maps."""


class AllocationLog:
    """Every allocation and free of a trace, in order: what the allocator model replays.

    An entry is a storage's number (its order of first sight) and its exact bytes, or that number
    and -1 for its free. Two flat integer arrays keep a long trace small and cheap to pickle."""

    def __init__(self) -> None:
        self.storages = array("q")
        self.sizes = array("q")
        self.iteration_starts: list[int] = []
        """Where each train-step iteration begins in the log."""
        self.end: int | None = None
        """Where the traced steps ended (what follows is the model's teardown)."""

    def allocate(self, storage: int, nbytes: int) -> None:
        self.storages.append(storage)
        self.sizes.append(nbytes)

    def free(self, storage: int) -> None:
        self.storages.append(storage)
        self.sizes.append(-1)

    def __len__(self) -> int:
        return len(self.storages)

    def live_at_end(self) -> set[int]:
        """Storages allocated and not freed when the traced steps ended: parameters, buffers and
        optimizer state, what a process keeps from one step to the next."""
        end = len(self) if self.end is None else self.end
        live: set[int] = set()
        for storage, nbytes in zip(self.storages[:end], self.sizes[:end], strict=True):
            if nbytes < 0:
                live.discard(storage)
            else:
                live.add(storage)
        return live

    def allocated_before_iteration(self, iteration: int) -> set[int]:
        """Storages live when `iteration` (0-based) began."""
        stop = self.iteration_starts[iteration]
        live: set[int] = set()
        for storage, nbytes in zip(self.storages[:stop], self.sizes[:stop], strict=True):
            if nbytes < 0:
                live.discard(storage)
            else:
                live.add(storage)
        return live

    def events(self, *, iterations: int | None = None) -> Iterator[tuple[int, int]]:
        """(storage, bytes or -1) up to the end of the traced steps; with `iterations` beyond
        those traced, the last traced iteration again as often as needed (a steady-state step
        repeats: its own storages get new numbers, older ones such as parameters stay)."""
        end = len(self) if self.end is None else self.end
        yield from zip(self.storages[:end], self.sizes[:end], strict=True)
        traced = len(self.iteration_starts)
        if iterations is None or iterations <= traced or traced == 0:
            return
        last = self.iteration_starts[-1]
        older = set(self.storages[:last])
        fresh_numbers = max(self.storages[:end], default=0) + 1
        for repeat in range(1, iterations - traced + 1):
            offset = repeat * fresh_numbers
            for storage, nbytes in zip(self.storages[last:end], self.sizes[last:end], strict=True):
                yield (storage if storage in older else storage + offset), nbytes


class OutOfMemory(Exception):
    """The modelled allocator cannot serve a request within its capacity."""


@dataclass(frozen=True)
class AllocatorStats:
    """What `torch.cuda.memory_stats` would report at the end of a replay."""

    peak_allocated_bytes: int
    """`max_memory_allocated`: the largest sum of allocated block sizes."""
    peak_reserved_bytes: int
    """`max_memory_reserved`: the largest sum of segments (or mapped pages) held."""
    num_alloc_retries: int
    """Requests that found no room until cached segments were returned to the driver."""
    out_of_memory: bool
    """Whether a request could not be served within the capacity."""


class _Block:
    __slots__ = ("addr", "allocated", "mapped", "next", "pool", "prev", "segment", "size")

    def __init__(self, pool: _Pool, segment: int, addr: int, size: int, *, mapped: bool = True) -> None:
        self.pool = pool
        self.segment = segment
        self.addr = addr
        self.size = size
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None

    @property
    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    """Free blocks of one pool, ordered by (size, address) for best fit; with expandable segments
    also its unmapped ranges, ordered by address."""

    def __init__(self, *, small: bool) -> None:
        self.small = small
        self.page = SMALL_BUFFER if small else LARGE_BUFFER
        self._keys: list[tuple[int, int]] = []
        self._blocks: dict[int, _Block] = {}
        self.unmapped: list[tuple[int, int]] = []
        self._unmapped_blocks: dict[int, _Block] = {}
        self.expandable_base: int | None = None

    def insert(self, block: _Block) -> None:
        bisect.insort(self._keys, (block.size, block.addr))
        self._blocks[block.addr] = block

    def remove(self, block: _Block) -> None:
        index = bisect.bisect_left(self._keys, (block.size, block.addr))
        del self._keys[index]
        del self._blocks[block.addr]

    def best_fit(self, size: int) -> int:
        """Index of the first free block of at least `size` bytes (len when there is none)."""
        return bisect.bisect_left(self._keys, (size, -1))

    def at(self, index: int) -> _Block | None:
        if index >= len(self._keys):
            return None
        return self._blocks[self._keys[index][1]]

    def free_blocks(self) -> list[_Block]:
        return [self._blocks[addr] for _size, addr in self._keys]

    def insert_unmapped(self, block: _Block) -> None:
        bisect.insort(self.unmapped, (block.addr, block.size))
        self._unmapped_blocks[block.addr] = block

    def remove_unmapped(self, block: _Block) -> None:
        index = bisect.bisect_left(self.unmapped, (block.addr, block.size))
        del self.unmapped[index]
        del self._unmapped_blocks[block.addr]

    def unmapped_blocks(self) -> list[_Block]:
        return [self._unmapped_blocks[addr] for addr, _size in self.unmapped]


class CachingAllocatorModel:
    """Replays allocations (`malloc`) and frees (`free`) as PyTorch's caching allocator would
    serve them, on a card whose allocator may hold at most `capacity_bytes` (None: unbounded).

    With a capacity, a request that cannot be served raises `OutOfMemory`; the state is then
    that of the failed request, as on a GPU."""

    def __init__(
        self, settings: AllocatorSettings | None = None, *, capacity_bytes: int | None = None
    ) -> None:
        self.settings = settings or AllocatorSettings()
        self.capacity_bytes = capacity_bytes
        self._small = _Pool(small=True)
        self._large = _Pool(small=False)
        self._active: dict[int, _Block] = {}
        self._next_segment = 0
        self._next_address = 0
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.num_alloc_retries = 0
        self.out_of_memory = False

    # ------------------------------------------------------------------------------ public

    def malloc(self, key: int, nbytes: int) -> None:
        """Serve a request of `nbytes` for the storage `key`."""
        size = self.round_size(nbytes)
        pool = self._small if size <= SMALL_SIZE else self._large
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._alloc_block(pool, size)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size)
            if block is None:
                self._release_cached_blocks()
                self.num_alloc_retries += 1
                block = self._alloc_block(pool, size)
            if block is None:
                self.out_of_memory = True
                raise OutOfMemory(f"cannot allocate {nbytes} bytes within {self.capacity_bytes} bytes")
        block = self._take(block, size)
        block.allocated = True
        self._active[key] = block
        self.allocated_bytes += block.size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)

    def free(self, key: int) -> None:
        """Return the block of storage `key` to its pool (unknown keys are ignored)."""
        block = self._active.pop(key, None)
        if block is None:
            return
        block.allocated = False
        self.allocated_bytes -= block.size
        pool = block.pool
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour)
        pool.insert(block)

    def clone(self) -> CachingAllocatorModel:
        """An independent copy of this allocator's state."""
        twin = CachingAllocatorModel(self.settings, capacity_bytes=self.capacity_bytes)
        for name in (
            "_next_segment",
            "_next_address",
            "allocated_bytes",
            "reserved_bytes",
            "peak_allocated_bytes",
            "peak_reserved_bytes",
            "num_alloc_retries",
            "out_of_memory",
        ):
            setattr(twin, name, getattr(self, name))
        pools = {id(self._small): twin._small, id(self._large): twin._large}
        copies: dict[int, _Block] = {}
        originals: list[_Block] = []

        def copy_of(block: _Block) -> _Block:
            made = _Block(pools[id(block.pool)], block.segment, block.addr, block.size, mapped=block.mapped)
            made.allocated = block.allocated
            copies[id(block)] = made
            originals.append(block)
            return made

        for key, block in self._active.items():
            twin._active[key] = copy_of(block)
        for old, new in ((self._small, twin._small), (self._large, twin._large)):
            new.expandable_base = old.expandable_base
            for block in old.free_blocks():
                new.insert(copy_of(block))
            for block in old.unmapped_blocks():
                new.insert_unmapped(copy_of(block))
        for block in originals:
            made = copies[id(block)]
            made.prev = None if block.prev is None else copies[id(block.prev)]
            made.next = None if block.next is None else copies[id(block.next)]
        return twin

    def empty_cache(self) -> None:
        """`torch.cuda.empty_cache()`: return every wholly free segment (or page) to the driver."""
        self._release_cached_blocks()

    def reset_peak(self) -> None:
        """`torch.cuda.reset_peak_memory_stats()`."""
        self.peak_allocated_bytes = self.allocated_bytes
        self.peak_reserved_bytes = self.reserved_bytes

    def stats(self) -> AllocatorStats:
        return AllocatorStats(
            peak_allocated_bytes=self.peak_allocated_bytes,
            peak_reserved_bytes=self.peak_reserved_bytes,
            num_alloc_retries=self.num_alloc_retries,
            out_of_memory=self.out_of_memory,
        )

    def round_size(self, nbytes: int) -> int:
        """The block size a request of `nbytes` is rounded to."""
        if nbytes < MIN_BLOCK_SIZE:
            return MIN_BLOCK_SIZE
        divisions = self.settings.roundup_power2_divisions
        if divisions > 1 and nbytes > MIN_BLOCK_SIZE * divisions:
            return _next_power2_division(nbytes, divisions)
        return -(-nbytes // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE

    # ------------------------------------------------------------------------- internals

    def _reserve(self, nbytes: int) -> bool:
        if self.capacity_bytes is not None and self.reserved_bytes + nbytes > self.capacity_bytes:
            return False
        self.reserved_bytes += nbytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return True

    def _max_split(self) -> int | None:
        return self.settings.max_split_size_bytes

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        index = pool.best_fit(size)
        block = pool.at(index)
        if block is None:
            return None
        if block.segment < 0:  # a block of the expandable segment
            # Best fit counts what a block could grow into: avoid taking the segment's growing end
            # when a block of the same or nearly the same size lies elsewhere.
            following = pool.at(index + 1)
            while following is not None and _expandable_size(following) < _expandable_size(block):
                block, index = following, index + 1
                following = pool.at(index + 1)
        max_split = self._max_split()
        if max_split is not None:
            if size < max_split <= block.size:
                return None  # an oversize block is not handed out for a smaller request
            if size >= max_split and block.size >= size + LARGE_BUFFER:
                return None
        pool.remove(block)
        return block

    def _alloc_block(self, pool: _Pool, size: int) -> _Block | None:
        if self.settings.expandable_segments:
            return self._allocate_expandable(pool, size)
        segment_size = _allocation_size(size)
        if not self._reserve(segment_size):
            return None
        segment = self._next_segment
        self._next_segment += 1
        block = _Block(pool, segment, self._next_address, segment_size)
        self._next_address += segment_size
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        remaining = block.size - size
        if block.pool.small or self.settings.expandable_segments:
            return remaining >= MIN_BLOCK_SIZE
        max_split = self._max_split()
        return (max_split is None or size < max_split) and remaining > SMALL_SIZE

    def _take(self, block: _Block, size: int) -> _Block:
        """Split `size` bytes off the front of a free block that is out of the pool; the rest
        goes back to the pool."""
        if not self._should_split(block, size):
            return block
        front = _Block(block.pool, block.segment, block.addr, size)
        front.prev = block.prev
        if front.prev is not None:
            front.prev.next = front
        front.next = block
        block.prev = front
        block.addr += size
        block.size -= size
        block.pool.insert(block)
        return front

    def _try_merge(self, block: _Block, neighbour: _Block | None) -> None:
        """Absorb a free neighbour in the same segment (and the same mapping state) into `block`."""
        if neighbour is None or neighbour.allocated or neighbour.mapped != block.mapped:
            return
        if neighbour.mapped:
            neighbour.pool.remove(neighbour)
        else:
            neighbour.pool.remove_unmapped(neighbour)
        if neighbour is block.prev:
            block.addr = neighbour.addr
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """With `max_split_size_mb`: return oversize free blocks to the driver, the smallest one
        large enough, else the largest ones until enough are returned."""
        max_split = self._max_split()
        if max_split is None:
            return False
        wanted = max(size, max_split)
        index = pool.best_fit(wanted)
        block = pool.at(index)
        if block is not None:
            self._release_segment(block)
            return True
        released = 0
        for candidate in reversed(pool.free_blocks()):
            if released >= wanted or candidate.size < max_split:
                break
            released += candidate.size
            self._release_segment(candidate)
        return released >= wanted

    def _release_cached_blocks(self) -> None:
        for pool in (self._large, self._small):
            for block in pool.free_blocks():
                if block.segment < 0:
                    self._unmap(block)
                elif not block.is_split:
                    self._release_segment(block)

    def _release_segment(self, block: _Block) -> None:
        block.pool.remove(block)
        self.reserved_bytes -= block.size

    # ------------------------------------------------------------------ expandable segments

    def _allocate_expandable(self, pool: _Pool, size: int) -> _Block | None:
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            following = candidate.next
            assert following is not None and not following.mapped
            if not self._map(following, min(size - candidate.size, following.size)):
                return None
            candidate = following  # mapping merged the candidate into it
        pool.remove(candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """The lowest address where `size` bytes of free and unmapped space lie together."""
        for unmapped in pool.unmapped_blocks():
            start = unmapped
            if start.prev is not None and not start.prev.allocated:
                start = start.prev
            room = 0
            cursor: _Block | None = start
            while cursor is not None and room < size and not cursor.allocated:
                room += cursor.size
                cursor = cursor.next
            if room >= size:
                return start
        # No expandable segment yet in this pool (or none with room): reserve address space.
        base = (self._next_address // pool.page + 1) * pool.page
        self._next_address = base + _ADDRESS_SPACE
        pool.expandable_base = base
        block = _Block(pool, -1, base, _ADDRESS_SPACE, mapped=False)
        pool.insert_unmapped(block)
        return block

    def _map(self, block: _Block, size: int) -> bool:
        """Map the pages covering the first `size` bytes of an unmapped block."""
        pool = block.pool
        pages = -(-size // pool.page)
        mapped = min(pages * pool.page, block.size)
        if not self._reserve(mapped):
            return False
        pool.remove_unmapped(block)
        block.mapped = True
        if mapped < block.size:
            rest = _Block(pool, block.segment, block.addr + mapped, block.size - mapped, mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            pool.insert_unmapped(rest)
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.insert(block)
        return True

    def _unmap(self, block: _Block) -> None:
        """Give back the whole free pages inside a free block of an expandable segment."""
        pool = block.pool
        assert pool.expandable_base is not None
        offset = block.addr - pool.expandable_base
        first = -(-offset // pool.page) * pool.page + pool.expandable_base
        last = (offset + block.size) // pool.page * pool.page + pool.expandable_base
        if first >= last:
            return
        pool.remove(block)
        if first > block.addr:
            before = _Block(pool, block.segment, block.addr, first - block.addr)
            before.prev, before.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            pool.insert(before)
        end = block.addr + block.size
        if end > last:
            after = _Block(pool, block.segment, last, end - last)
            after.prev, after.next = block, block.next
            if block.next is not None:
                block.next.prev = after
            block.next = after
            pool.insert(after)
        block.addr, block.size, block.mapped = first, last - first, False
        self.reserved_bytes -= block.size
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        pool.insert_unmapped(block)


def _expandable_size(block: _Block) -> int:
    following = block.next
    return block.size + (following.size if following is not None and not following.mapped else 0)


def _allocation_size(size: int) -> int:
    """The segment a request that found no free block makes the allocator reserve."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def _next_power2_division(size: int, divisions: int) -> int:
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def smallest_passing_capacity(
    passes: Callable[[int], bool], failing: int, passing: int, *, precision: int = SMALL_BUFFER
) -> int:
    """The smallest capacity at which `passes`, to `precision`, between a capacity known to fail
    and one known to pass (the replay's verdict is monotone in the capacity: more room never
    makes a request fail)."""
    while passing - failing > precision:
        middle = (failing + passing) // 2
        if passes(middle):
            passing = middle
        else:
            failing = middle
    return passing


_WARMED: dict[tuple[int, AllocatorSettings, int], tuple[AllocationLog, CachingAllocatorModel]] = {}
_WARMED_KEPT = 8


def _after_warmup(
    warmup: AllocationLog, settings: AllocatorSettings, preallocated_bytes: int
) -> CachingAllocatorModel:
    """The allocator after the warm-up step ran (unbounded) and the cache was emptied: what every
    replay with that history starts from, made once and then cloned."""
    key = (id(warmup), settings, preallocated_bytes)
    found = _WARMED.get(key)
    if found is not None and found[0] is warmup:
        return found[1]
    model = CachingAllocatorModel(settings)
    if preallocated_bytes > 0:
        model.malloc(-1, preallocated_bytes)
    # When the traced steps end, only what the process keeps is still live.
    for storage, nbytes in warmup.events():
        key_of_storage = -2 - storage  # apart from the step's own numbers
        if nbytes < 0:
            model.free(key_of_storage)
        else:
            model.malloc(key_of_storage, nbytes)
    model.empty_cache()
    model.reset_peak()
    if len(_WARMED) >= _WARMED_KEPT:
        _WARMED.pop(next(iter(_WARMED)))
    _WARMED[key] = (warmup, model)
    return model


def replay(
    log: AllocationLog,
    settings: AllocatorSettings | None = None,
    *,
    capacity_bytes: int | None = None,
    preallocated_bytes: int = 0,
    iterations: int | None = None,
    warmup: AllocationLog | None = None,
) -> AllocatorStats:
    """Serve a trace's allocations and frees with a fresh allocator (a fresh process's), after
    `preallocated_bytes` that live throughout (library workspaces); `iterations` as in
    `AllocationLog.events`. With a capacity, the replay stops at the first request that does not
    fit (`out_of_memory`), as a real step would.

    With a `warmup` log, the process first ran that trace (unbounded): what it kept (the model
    and its optimizer state) stays where the warm-up put it, the rest is freed and the cache
    emptied; the traced step then reuses the kept storages instead of making its own. That is the
    history of a loop that first ran a smaller step (a sanity check, a first trial)."""
    skipped: set[int] = set()
    if warmup is None:
        model = CachingAllocatorModel(settings)
    else:
        model = _after_warmup(warmup, settings or AllocatorSettings(), preallocated_bytes).clone()
        skipped = log.live_at_end()
    try:
        if warmup is None and preallocated_bytes > 0:
            model.malloc(-1, preallocated_bytes)
        model.capacity_bytes = capacity_bytes
        for storage, nbytes in log.events(iterations=iterations):
            if storage in skipped:
                continue
            if nbytes < 0:
                model.free(storage)
            else:
                model.malloc(storage, nbytes)
    except OutOfMemory:
        pass  # recorded in the model's stats
    return model.stats()
