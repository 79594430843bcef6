"""The device model: the allocator replay plus what CUDA adds (workspaces, activation slack, the
context), and the verdict on a card, on hand-made allocation logs."""

from __future__ import annotations

from probes.estimate.allocator import AllocationLog
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, MIB, DeviceModel, compute_dtype_bytes
from tuner.alloc_conf import AllocatorSettings

H100_BYTES = 85_017_493_504
DEFAULT = AllocatorSettings()


def one_step(*sizes: int) -> AllocationLog:
    """A parameter of 30 MiB, then one iteration that allocates `sizes` and frees them."""
    log = AllocationLog()
    log.allocate(0, 30 * MIB)
    log.iteration_starts.append(len(log))
    for number, size in enumerate(sizes, start=1):
        log.allocate(number, size)
    for number in range(1, len(sizes) + 1):
        log.free(number)
    log.end = len(log)
    return log


def test_usable_bytes_leave_room_for_the_cuda_context() -> None:
    model = DeviceModel(context_overhead_bytes=800 * MIB)
    assert model.usable_bytes(H100_BYTES) == H100_BYTES - 800 * MIB
    assert model.usable_bytes(100 * MIB) == 0


def test_the_activation_slack_is_a_fraction_of_activations_twice_as_large_for_fp32() -> None:
    model = DeviceModel(activation_slack=0.02, activation_slack_checkpointing=0.0)
    bf16 = model.slack_bytes(1000 * MIB, gradient_checkpointing=False, compute_dtype_bytes=2)
    fp32 = model.slack_bytes(1000 * MIB, gradient_checkpointing=False, compute_dtype_bytes=4)
    assert bf16 == 20 * MIB and fp32 == 40 * MIB
    assert model.slack_bytes(1000 * MIB, gradient_checkpointing=True) == 0
    assert model.slack_bytes(MIB, gradient_checkpointing=False) == 2 * MIB  # whole segments
    assert compute_dtype_bytes("fp32") == 4 and compute_dtype_bytes("bf16-mixed") == 2


def test_the_replay_adds_the_workspaces_and_the_slack_to_the_allocators_peaks() -> None:
    model = DeviceModel(persistent_untracked_bytes=40 * MIB, activation_slack=0.0)
    stats = model.replay(one_step(100 * MIB), DEFAULT)
    assert stats.peak_allocated_bytes == (30 + 100 + 40) * MIB
    assert stats.peak_reserved_bytes == (30 + 100 + 40) * MIB
    slack = DeviceModel(persistent_untracked_bytes=0, activation_slack=0.1)
    with_slack = slack.replay(one_step(100 * MIB), DEFAULT, activation_bytes=100 * MIB)
    assert with_slack.peak_allocated_bytes == (30 + 100 + 10) * MIB


def test_a_step_fits_a_capacity_only_with_room_for_its_slack() -> None:
    model = DeviceModel(persistent_untracked_bytes=0, activation_slack=0.1)
    log = one_step(100 * MIB)
    assert not model.replay(log, DEFAULT, capacity_bytes=145 * MIB, activation_bytes=100 * MIB).out_of_memory
    assert model.replay(log, DEFAULT, capacity_bytes=145 * MIB, activation_bytes=200 * MIB).out_of_memory


def test_the_verdict_is_the_worse_of_a_fresh_process_and_one_after_a_warm_up() -> None:
    log = one_step(40 * MIB, 40 * MIB)
    warmup = one_step(12 * MIB)
    model = DeviceModel(persistent_untracked_bytes=0, activation_slack=0.0)
    fresh = model.replay(log, DEFAULT)
    both = model.replay(log, DEFAULT, warmup=warmup)
    assert both.peak_reserved_bytes >= fresh.peak_reserved_bytes


def test_the_defaults_are_the_fit_on_the_h100_calibration_set() -> None:
    # tests/probes/test_estimate_calibration.py refits them from the shared file and compares.
    assert DEFAULT_DEVICE_MODEL.context_overhead_bytes > 527 * MIB  # at least the context itself
    assert DEFAULT_DEVICE_MODEL.replay_iterations >= 3
