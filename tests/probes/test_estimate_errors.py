"""Workloads an estimate cannot handle fail with one clear sentence, never a crash."""

from __future__ import annotations

import pytest

from probes.estimate import emulation
from probes.estimate.remote import estimate_peak
from probes.estimate.trace import trace_peak
from tests.probes.tiny_specs import FEATURES
from tuner.errors import EstimateError, ModelBuildError
from tuner.spec import WorkloadSpec, parse_workload


def python_spec(factory: str) -> WorkloadSpec:
    return parse_workload(
        {"model": {"family": "python", "factory": f"tests.probes.factories:{factory}"}, "inputs": FEATURES}
    )


def test_item_in_forward_is_a_clear_estimate_error() -> None:
    with pytest.raises(EstimateError) as caught:
        estimate_peak(python_spec("item_in_forward"), 2, timeout=120)
    message = caught.value.message
    assert "cannot be estimated without a GPU" in message
    assert ".item()" in message
    assert "cuda backend" in message
    # The line of the user's model that reads the value, not a line inside torch.
    assert "tests/probes/factories.py:80" in message
    assert caught.value.code == "estimate_failed"


def test_a_model_that_cannot_be_built_stays_a_build_error() -> None:
    with pytest.raises(ModelBuildError, match="always fails"):
        estimate_peak(python_spec("raises"), 2, timeout=120)


def test_a_trace_past_its_timeout_is_an_estimate_error() -> None:
    with pytest.raises(EstimateError, match="did not finish within"):
        estimate_peak(python_spec("classifier"), 2, timeout=0.2)


def test_tracing_without_the_emulation_is_refused() -> None:
    assert not emulation.installed()
    with pytest.raises(EstimateError, match="emulation is not installed"):
        trace_peak(python_spec("classifier"), 2)
