"""The device model: from traced bytes to a fit verdict on a card."""

from __future__ import annotations

import pytest

from probes.estimate.device_model import (
    DEFAULT_DEVICE_MODEL,
    GIB,
    MIB,
    DeviceModel,
    Measurement,
    calibrate,
)

H100_BYTES = 85_017_493_504


def test_usable_bytes_leave_room_for_the_cuda_context() -> None:
    model = DeviceModel(context_overhead_bytes=800 * MIB)
    assert model.usable_bytes(H100_BYTES) == H100_BYTES - 800 * MIB
    assert model.usable_bytes(100 * MIB) == 0


def test_reserved_bytes_add_the_fragmentation_allowance_in_whole_segments() -> None:
    model = DeviceModel(fragmentation=1.05, fragmentation_checkpointing=1.15)
    assert model.reserved_bytes(10 * GIB, gradient_checkpointing=False) == 10752 * MIB
    assert model.reserved_bytes(10 * GIB, gradient_checkpointing=True) == 11776 * MIB
    assert model.reserved_bytes(1, gradient_checkpointing=False) == 2 * MIB


def test_fit_verdict_compares_reserved_with_usable_less_margin() -> None:
    model = DeviceModel(context_overhead_bytes=1 * GIB)
    assert model.fits(79 * GIB, 80 * GIB)
    assert not model.fits(79 * GIB + 1, 80 * GIB)
    assert not model.fits(79 * GIB, 80 * GIB, memory_margin=0.05)
    assert model.fits(int(79 * GIB * 0.95), 80 * GIB, memory_margin=0.05)


def test_allocated_bytes_add_what_the_trace_cannot_see() -> None:
    assert DEFAULT_DEVICE_MODEL.allocated_bytes(0) == DEFAULT_DEVICE_MODEL.untracked_allocated_bytes > 0


def test_calibration_fits_gap_and_worst_fragmentation() -> None:
    measurements = [
        Measurement(10 * GIB, 10 * GIB + 60 * MIB, 11 * GIB),
        Measurement(20 * GIB, 20 * GIB + 70 * MIB, 21 * GIB),
        Measurement(30 * GIB, 30 * GIB + 100 * MIB, 31 * GIB),
        Measurement(5 * GIB, 5 * GIB + 64 * MIB, 7 * GIB, gradient_checkpointing=True),
    ]
    model = calibrate(measurements)
    assert model.untracked_allocated_bytes == 67 * MIB  # median of 60, 64, 70, 100
    assert model.fragmentation == pytest.approx((11 * GIB) / (10 * GIB + 60 * MIB))
    assert model.fragmentation_checkpointing == pytest.approx((7 * GIB) / (5 * GIB + 64 * MIB))
    assert model.context_overhead_bytes == DEFAULT_DEVICE_MODEL.context_overhead_bytes


def test_calibration_without_measurements_keeps_the_defaults() -> None:
    assert calibrate([]) == DEFAULT_DEVICE_MODEL
