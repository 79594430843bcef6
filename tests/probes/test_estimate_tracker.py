"""The live-bytes tracker on real CPU tensors (a dispatch mode: nothing process-global)."""

from __future__ import annotations

import torch

from probes.estimate.tracker import MemoryTracker, rounded


def test_rounds_to_the_allocator_granularity() -> None:
    assert [rounded(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]


def test_counts_new_storages_once_and_releases_them() -> None:
    tracker = MemoryTracker()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B → 4096
        view = a[10:20]
        b = a + 1  # 4096 more
        assert tracker.live_bytes == 8192  # the view shares a's storage
        del a
        assert tracker.live_bytes == 8192  # the view keeps a's storage alive
        del view
        assert tracker.live_bytes == 4096
    assert tracker.peak_bytes == 8192
    del b
    assert tracker.live_bytes == 0


def test_remembers_phase_and_categories_at_the_peak() -> None:
    weight = torch.empty(256)  # made before the mode: counted as a parameter
    tracker = MemoryTracker()
    tracker.classify([weight], "parameters")
    with tracker:
        tracker.set_phase("forward", 0)
        big = torch.empty(10_000)
        tracker.set_phase("backward", 0)
        del big
        small = torch.empty(10)
        tracker.classify([small], "gradients")
    assert tracker.peak_phase == "forward"
    assert tracker.peak_categories == {
        "parameters": 1024,
        "gradients": 0,
        "buckets": 0,
        "optimizer_state": 0,
        "activations": 40448,
    }
    assert tracker.peak_by_phase["backward"] == 1024 + 512
    assert tracker.live_bytes == 1024 + 512
