"""Trial backends for `run_probe(..., trial_factory="tests.probes.fake_backends:NAME")`: they run
inside the probe's real child process and misbehave the ways a GPU trial can."""

from __future__ import annotations

import os
import time
from typing import Any

from probes.probe import TrialBackend
from tests.unit.synthetic_devices import DEVICES_BY_NAME
from tuner.search_types import Trial
from tuner.spec import DeviceSpec, WorkloadSpec

FAKE_DEVICE = DeviceSpec(name="Synthetic 80GB", total_memory_bytes=80 << 30)


def _backend(fits: Any, **kwargs: Any) -> TrialBackend:
    return TrialBackend(fits=fits, device=FAKE_DEVICE, capacity_bytes=79 << 30, **kwargs)


def aborting(spec: WorkloadSpec, *, gradient_checkpointing: bool, device: DeviceSpec | None) -> TrialBackend:
    """The second trial aborts the process (as a failed CUDA assertion does)."""

    def fits(batch_size: int) -> Trial:
        if batch_size > 1:
            os.abort()
        return Trial(batch_size=batch_size, ok=True, peak_reserved_bytes=1 << 30)

    return _backend(fits)


def hanging(spec: WorkloadSpec, *, gradient_checkpointing: bool, device: DeviceSpec | None) -> TrialBackend:
    """The first trial never returns (a deadlocked collective, a stuck kernel)."""

    def fits(batch_size: int) -> Trial:
        time.sleep(3600)
        raise AssertionError("unreachable")

    return _backend(fits)


def raising(spec: WorkloadSpec, *, gradient_checkpointing: bool, device: DeviceSpec | None) -> TrialBackend:
    """The first trial raises an error that is not an out-of-memory error."""

    def fits(batch_size: int) -> Trial:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    return _backend(fits)


def synthetic(spec: WorkloadSpec, *, gradient_checkpointing: bool, device: DeviceSpec | None) -> TrialBackend:
    """The gpt2-like synthetic device (true maximum 52); a longer verification run holds only
    up to 50 (the boundary's noise across processes)."""
    model = DEVICES_BY_NAME["gpt2-like linear"].fresh()

    def verify(batch_size: int, steps: int) -> Trial:
        return Trial(batch_size=batch_size, ok=batch_size <= model.true_max - 2)

    return TrialBackend(fits=model.fits, device=FAKE_DEVICE, capacity_bytes=model.capacity, verify=verify)


def preparing(spec: WorkloadSpec, *, gradient_checkpointing: bool, device: DeviceSpec | None) -> TrialBackend:
    """The gpt2-like synthetic device behind a model that must be built (`prepare`) before the first
    trial: a search that takes a prior traced beside it builds the model while it waits."""
    model = DEVICES_BY_NAME["gpt2-like linear"].fresh()
    built: list[bool] = []

    def fits(batch_size: int) -> Trial:
        if not built:
            raise RuntimeError("a trial ran before the model was built")
        return model.fits(batch_size)

    return TrialBackend(
        fits=fits, device=FAKE_DEVICE, capacity_bytes=model.capacity, prepare=lambda: built.append(True)
    )
