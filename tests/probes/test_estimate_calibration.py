"""The device model against real H100 runs (../shared/calibration/h100-gpt2.json): the fit is
reproduced from the file, the replay reproduces the real reserved bytes where the runs' allocator
history is known, and the estimate's largest micro-batch never exceeds the real one.

Traces run in child processes (the CUDA emulation is process-global)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from probes.child import run_in_child
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, MIB
from tests.conftest import REPO

CALIBRATION = REPO.parent / "shared" / "calibration" / "h100-gpt2.json"

pytestmark = [
    pytest.mark.slow,
    # The fit traces every calibration trial (about a minute alone, more on a busy machine).
    pytest.mark.timeout(1500),
    pytest.mark.skipif(not CALIBRATION.exists(), reason=f"{CALIBRATION} is not present"),
]


def _calibrate(path: str) -> tuple[object, list[object], bool, int, int | None]:
    from probes.estimate.calibration import calibrate, load_calibration
    from probes.estimate.session import calibration_tracer

    fit = calibrate(load_calibration(path), calibration_tracer())
    return fit.device_model, fit.points, fit.consistent, fit.capacity_low_bytes, fit.capacity_high_bytes


@pytest.fixture(scope="module")
def fit() -> tuple[object, list[object], bool, int, int | None]:
    result: tuple[object, list[object], bool, int, int | None] = run_in_child(
        _calibrate, str(CALIBRATION), timeout=900, what="calibration fit"
    )
    return result


def test_the_default_device_model_is_the_fit_of_the_calibration_file(fit: tuple) -> None:  # type: ignore[type-arg]
    model, _points, consistent, low, high = fit
    assert consistent, f"no capacity passes every real pass ({low}) and fails every failure ({high})"
    assert model.context_overhead_bytes == pytest.approx(DEFAULT_DEVICE_MODEL.context_overhead_bytes, abs=MIB)
    assert model.persistent_untracked_bytes == pytest.approx(
        DEFAULT_DEVICE_MODEL.persistent_untracked_bytes, abs=MIB
    )
    assert model.activation_slack == pytest.approx(DEFAULT_DEVICE_MODEL.activation_slack, abs=5e-4)
    assert model.activation_slack_checkpointing == pytest.approx(
        DEFAULT_DEVICE_MODEL.activation_slack_checkpointing, abs=5e-4
    )


def test_the_replay_reproduces_real_fragmentation_where_the_history_is_known(fit: tuple) -> None:  # type: ignore[type-arg]
    _model, points, *_ = fit
    passing = [p for p in points if p.ok and p.batch_size >= 8]
    assert len(passing) >= 20
    for point in passing:
        real = point.real_reserved_bytes / point.real_allocated_bytes
        replayed = point.model_reserved_bytes / point.model_allocated_bytes
        # Reserved over allocated (the allocator's own overhead), free of the allocated gap.
        assert replayed == pytest.approx(real, abs=0.02), (point.set_name, point.batch_size)


def test_no_real_failure_passes_the_fitted_verdict_and_every_real_pass_is_within_reach(fit: tuple) -> None:  # type: ignore[type-arg]
    model, points, *_ = fit
    capacity = 85_017_493_504 - model.context_overhead_bytes
    judged = [p for p in points if p.needed_capacity_bytes is not None]
    assert any(not p.ok for p in judged) and any(p.ok for p in judged)
    for point in judged:
        if not point.ok:
            assert point.needed_capacity_bytes > capacity, (point.set_name, point.batch_size)
        else:
            assert point.needed_capacity_bytes <= capacity, (point.set_name, point.batch_size)


def _largest(spec_path: str, checkpointing: bool, alloc_conf: str | None) -> int:
    import json

    from probes.estimate.session import search_max_batch
    from tuner.spec import parse_workload

    data = json.loads(Path(spec_path).read_text())
    spec = parse_workload({**data["sets"][0]["spec"], "loop": {"keeps_outputs": True}})
    total = int(data["device"]["total_memory_bytes"])
    result = search_max_batch(spec, total, gradient_checkpointing=checkpointing, alloc_conf=alloc_conf)
    return result.max_batch_size


@pytest.mark.parametrize(
    ("checkpointing", "alloc_conf", "true_largest"),
    [(False, None, 51), (True, None, 100), (False, "expandable_segments:True", 52)],
)
def test_the_estimated_largest_micro_batch_never_exceeds_the_h100s(
    checkpointing: bool, alloc_conf: str | None, true_largest: int
) -> None:
    largest: int = run_in_child(
        _largest, str(CALIBRATION), checkpointing, alloc_conf, timeout=600, what="estimate search"
    )
    assert largest <= true_largest
    # Low, but not uselessly so: within 10 % of the card's truth.
    assert largest >= math.floor(0.9 * true_largest)
