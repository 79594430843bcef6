"""The caching-allocator model on hand-made request sequences whose outcome PyTorch's allocator
(c10/cuda/CUDACachingAllocator.cpp) fixes: rounding, pools, splitting, best fit, no merging
across segments, the retry after returning cached segments, expandable segments."""

from __future__ import annotations

import pytest

from probes.estimate.allocator import AllocationLog, CachingAllocatorModel, OutOfMemory, replay
from tuner.alloc_conf import AllocatorSettings

MIB = 1 << 20
KIB = 1 << 10
EXPANDABLE = AllocatorSettings(expandable_segments=True)


def test_requests_round_to_512_bytes_and_small_ones_share_a_2_mib_segment() -> None:
    model = CachingAllocatorModel()
    model.malloc(1, 1)
    model.malloc(2, 1000)
    assert model.allocated_bytes == 512 + 1024
    assert model.reserved_bytes == 2 * MIB


def test_a_large_request_under_10_mib_takes_a_20_mib_segment_that_later_requests_share() -> None:
    model = CachingAllocatorModel()
    model.malloc(1, 3 * MIB)
    model.malloc(2, 3 * MIB)
    assert model.reserved_bytes == 20 * MIB
    assert model.allocated_bytes == 6 * MIB


def test_a_remainder_of_1_mib_or_less_is_not_split_off_a_large_block() -> None:
    model = CachingAllocatorModel()
    model.malloc(1, 11 * MIB - 100 * KIB)  # segment rounds to 12 MiB; the rest (1.1 MiB) is split
    assert model.allocated_bytes == 11 * MIB - 100 * KIB
    model.free(1)
    model.malloc(2, 11 * MIB + 100 * KIB)  # the 12 MiB block; its 0.9 MiB rest stays with it
    assert model.reserved_bytes == 12 * MIB
    assert model.allocated_bytes == 12 * MIB


def test_free_space_stranded_in_a_segment_is_fragmentation_by_a_known_amount() -> None:
    model = CachingAllocatorModel()
    model.malloc(1, 50 * MIB)
    model.malloc(2, 50 * MIB)
    model.free(1)
    model.malloc(3, 30 * MIB)  # best fit: the free 50 MiB segment, split 30 + 20
    model.malloc(4, 60 * MIB)  # nothing free fits: a new segment
    assert model.allocated_bytes == 140 * MIB
    assert model.reserved_bytes == 160 * MIB  # 20 MiB stranded next to the 30 MiB block
    assert model.peak_reserved_bytes - model.peak_allocated_bytes == 20 * MIB


def test_free_blocks_merge_within_a_segment_but_never_across_segments() -> None:
    model = CachingAllocatorModel()
    model.malloc(1, 30 * MIB)
    model.malloc(2, 30 * MIB)
    model.free(1)
    model.free(2)
    model.malloc(3, 50 * MIB)  # two free 30 MiB segments cannot serve it together
    assert model.reserved_bytes == 110 * MIB
    model.free(3)
    model.malloc(4, 12 * MIB)
    model.free(4)
    model.malloc(5, 50 * MIB)  # the split 50 MiB segment merged back whole
    assert model.reserved_bytes == 110 * MIB


def test_best_fit_takes_the_smallest_free_block_that_is_large_enough() -> None:
    model = CachingAllocatorModel()
    for key, size in ((1, 40 * MIB), (2, 24 * MIB), (3, 64 * MIB)):
        model.malloc(key, size)
    for key in (1, 2, 3):
        model.free(key)
    model.malloc(4, 22 * MIB)  # the 24 MiB segment, not the 40 or 64
    model.malloc(5, 40 * MIB)
    model.malloc(6, 64 * MIB)
    assert model.reserved_bytes == 128 * MIB


def test_running_out_returns_cached_segments_to_the_driver_and_retries_once() -> None:
    model = CachingAllocatorModel(capacity_bytes=100 * MIB)
    model.malloc(1, 60 * MIB)
    model.free(1)  # cached, not returned
    model.malloc(2, 70 * MIB)  # 60 + 70 > 100: the cached 60 MiB go back, then it fits
    assert model.num_alloc_retries == 1
    assert model.reserved_bytes == 70 * MIB
    with pytest.raises(OutOfMemory):
        model.malloc(3, 40 * MIB)
    assert model.out_of_memory


def test_a_split_segment_is_not_returned_on_a_retry() -> None:
    model = CachingAllocatorModel(capacity_bytes=64 * MIB)
    model.malloc(1, 30 * MIB)  # one 30 MiB segment...
    model.malloc(2, 2 * MIB)  # ...and a 20 MiB one, split: 2 MiB used, 18 free
    with pytest.raises(OutOfMemory):
        model.malloc(3, 20 * MIB)  # 18 MiB free in a segment in use cannot be returned


def test_expandable_segments_merge_neighbours_where_segments_would_strand_them() -> None:
    model = CachingAllocatorModel(EXPANDABLE)
    model.malloc(1, 30 * MIB)
    model.malloc(2, 30 * MIB)  # both in one segment, mapped in 20 MiB pages
    assert model.reserved_bytes == 60 * MIB
    model.free(1)
    model.free(2)
    model.malloc(3, 50 * MIB)  # the neighbours merged: no new pages
    assert model.reserved_bytes == 60 * MIB


def test_expandable_segments_give_back_whole_free_pages_on_a_retry() -> None:
    model = CachingAllocatorModel(EXPANDABLE, capacity_bytes=100 * MIB)
    model.malloc(1, 40 * MIB)
    model.malloc(2, 40 * MIB)
    model.free(1)  # two free 20 MiB pages at the segment's start
    model.malloc(3, 50 * MIB)  # 3 new pages would make 140 MiB: the free pages are unmapped first
    assert model.num_alloc_retries == 1
    assert model.reserved_bytes == 100 * MIB
    assert model.allocated_bytes == 90 * MIB


def test_roundup_power2_divisions_round_to_a_step_between_powers_of_two() -> None:
    model = CachingAllocatorModel(AllocatorSettings(roundup_power2_divisions=4))
    assert model.round_size(1_200_000) == 1_310_720  # 1 MiB + one quarter of 1 MiB
    assert model.round_size(1 << 20) == 1 << 20
    assert CachingAllocatorModel().round_size(1_200_000) == 1_200_128


def test_blocks_at_least_max_split_size_are_not_handed_to_smaller_requests() -> None:
    model = CachingAllocatorModel(AllocatorSettings(max_split_size_bytes=64 * MIB))
    model.malloc(1, 100 * MIB)
    model.free(1)
    model.malloc(2, 30 * MIB)  # not carved from the oversize 100 MiB block
    assert model.reserved_bytes == 130 * MIB


def test_a_log_replays_its_last_iteration_again_for_the_steady_state() -> None:
    log = AllocationLog()
    log.allocate(0, 4 * MIB)  # a parameter, kept
    log.iteration_starts.append(len(log))
    log.allocate(1, 30 * MIB)
    log.free(1)
    log.iteration_starts.append(len(log))
    log.allocate(2, 30 * MIB)
    log.allocate(3, 30 * MIB)
    log.free(2)
    log.free(3)
    log.end = len(log)
    once = replay(log)
    again = replay(log, iterations=4)
    assert once.peak_allocated_bytes == again.peak_allocated_bytes == 64 * MIB
    assert once.peak_reserved_bytes == again.peak_reserved_bytes
    assert len(list(log.events(iterations=4))) == len(log) + 2 * 4
    assert log.live_at_end() == {0}


def test_a_warm_up_step_leaves_what_the_process_keeps_where_it_put_it() -> None:
    def step(activation: int) -> AllocationLog:
        log = AllocationLog()
        log.allocate(0, 30 * MIB)  # the model, kept
        log.iteration_starts.append(len(log))
        log.allocate(1, activation)
        log.allocate(2, 30 * MIB)  # state made while the activation lives, kept
        log.free(1)
        log.end = len(log)
        return log

    fresh = replay(step(40 * MIB))
    warm = replay(step(40 * MIB), warmup=step(12 * MIB))
    # Fresh, the state takes the model's and the activation's segments' neighbours; after the
    # warm-up it already sits in the segment the small activation had, which empty_cache kept.
    assert fresh.peak_allocated_bytes == warm.peak_allocated_bytes == 100 * MIB
    assert warm.peak_reserved_bytes >= fresh.peak_reserved_bytes
