"""`run_probe`'s child-process orchestration on CPU: real spawned children that abort, hang or
raise; the probe fails with a clear message and this process carries on."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from probes.child import child_traceback, run_in_child, send_progress
from probes.probe import run_probe
from tests.probes.tiny_specs import WIDE_CNN
from tests.unit.synthetic_devices import DEVICES_BY_NAME
from tuner.errors import DeviceRequiredError, ModelBuildError, ProbeError
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, SearchConfig, Trial
from tuner.spec import DeviceSpec, WorkloadSpec, parse_workload

FAKES = "tests.probes.fake_backends"
MLP = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 2}},
        "inputs": {"kind": "features", "dim": 512, "num_classes": 10},
        "precision": "fp32",
    }
)


def _probe(factory: str, *, spec: WorkloadSpec = MLP, **kwargs: object) -> ProbeResult:
    return run_probe(
        spec,
        backend="cuda",
        gradient_checkpointing=False,
        trial_factory=f"{FAKES}:{factory}",
        **kwargs,  # type: ignore[arg-type]
    )


def test_an_aborting_trial_fails_the_probe_and_the_caller_lives() -> None:
    with pytest.raises(ProbeError, match=r"aborted \(SIGABRT\)"):
        _probe("aborting")
    assert os.getpid() > 0  # still here


def test_a_hanging_trial_is_stopped_at_the_timeout() -> None:
    with pytest.raises(ProbeError, match=r"did not finish within 4 s"):
        _probe("hanging", timeout=4)


def test_a_non_oom_error_fails_the_probe_naming_it() -> None:
    with pytest.raises(ProbeError, match="RuntimeError: CUDA error: an illegal memory access"):
        _probe("raising")


def test_progress_reaches_the_caller_trial_by_trial() -> None:
    seen: list[Trial] = []
    result = _probe("synthetic", progress=seen.append)
    assert seen == result.trials
    assert result.max_batch_size == DEVICES_BY_NAME["gpt2-like linear"].true_max


def test_verification_steps_down_until_the_answer_holds() -> None:
    result = _probe("synthetic", verify_steps=20)
    true_max = DEVICES_BY_NAME["gpt2-like linear"].true_max
    assert result.max_batch_size == true_max - 2
    assert result.verified_steps == 20
    tried = [v["batch_size"] for v in result.extra["verification"]]
    assert tried == [true_max, true_max - 1, true_max - 2]


def _probe_with_prior(factory: str, **kwargs: object) -> ProbeResult:
    """A probe whose prior is traced for real: a wide CNN, whose estimated line has a clear slope."""
    return _probe(
        factory, spec=WIDE_CNN, estimate_prior=True, search=SearchConfig(max_batch_size=4096), **kwargs
    )


@pytest.mark.slow
def test_the_prior_traced_beside_the_search_reaches_it() -> None:
    """The estimator traces its line in its own child while the search child builds its model;
    the search starts from the line's prediction, not from the cheap trials at b = 1 and 4."""
    result = _probe_with_prior("preparing")
    prior = result.extra["prior"]
    assert isinstance(prior, dict) and prior["per_sample_bytes"] > 0
    predicted = MemoryLine(**prior).largest_batch_under(result.capacity_bytes or 0)
    assert result.trials[0].batch_size == min(predicted, 4096) > 4
    assert result.max_batch_size == DEVICES_BY_NAME["gpt2-like linear"].true_max
    assert result.extra["prior_seconds"] > 0
    assert 0 <= result.extra["prior_wait_seconds"] <= result.extra["prior_seconds"]
    assert result.extra["search_wall_seconds"] <= result.seconds


@pytest.mark.slow
def test_a_prior_that_cannot_be_had_in_time_leaves_the_search_without_one() -> None:
    # The caller's estimate timeout is passed in (the CLI and the worker pass their setting's).
    result = _probe_with_prior("preparing", prior_timeout=0.2)
    assert result.extra["prior"].startswith("none: The prior estimate did not finish within 0.2 s")
    assert [t.batch_size for t in result.trials[:2]] == [1, 4]  # the cheap trials pin the line
    assert result.max_batch_size == DEVICES_BY_NAME["gpt2-like linear"].true_max


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_search_that_fails_leaves_its_prior_to_end_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cuda probe on this GPU-less machine: the real estimator starts tracing the prior, the
    search child fails at once; its error is what the caller gets, without waiting for the trace,
    which then ends on its own and finds nobody to hand its line to."""
    errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    with pytest.raises(ProbeError, match="needs a CUDA GPU"):
        run_probe(WIDE_CNN, backend="cuda", gradient_checkpointing=False)
    for thread in [t for t in threading.enumerate() if t.name == "tuner-prior"]:
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert errors == []


def test_the_estimate_backend_needs_a_device() -> None:
    with pytest.raises(DeviceRequiredError, match="total_memory_bytes"):
        run_probe(MLP, backend="estimate", gradient_checkpointing=False)


@pytest.mark.slow
def test_a_card_smaller_than_its_context_fits_nothing() -> None:
    result = run_probe(
        MLP,
        backend="estimate",
        device=DeviceSpec(name="Tiny card", total_memory_bytes=256 << 20),
        gradient_checkpointing=False,
        search=SearchConfig(max_batch_size=64),
    )
    assert (result.max_batch_size, result.stop_reason) == (0, "nothing_fits")


@pytest.mark.slow
def test_a_model_that_cannot_be_built_is_a_model_build_error() -> None:
    broken = WorkloadSpec.model_validate(
        {
            "model": {"family": "transformers", "config": {"model_type": "no-such-model"}},
            "inputs": {"kind": "tokens", "seq_len": 8},
        }
    )
    # The class the docs promise, not the child's wrapper of it.
    with pytest.raises(ModelBuildError) as caught:
        run_probe(
            broken,
            backend="estimate",
            device=DeviceSpec(name="card", total_memory_bytes=2 << 30),
            gradient_checkpointing=False,
            timeout=120,
        )
    assert caught.value.code == ModelBuildError.code
    # The child's own traceback comes with the failure, for the worker's log: where it failed.
    trace = child_traceback(caught.value)
    assert trace is not None and "Traceback (most recent call last)" in trace
    assert "no-such-model" in trace and "build_workload" in trace


def _raise_deep() -> None:
    raise RuntimeError("from deep inside the child")


def test_a_childs_traceback_survives_the_errors_it_causes() -> None:
    with pytest.raises(ProbeError) as caught:
        run_in_child(_raise_deep, timeout=60)
    trace = child_traceback(caught.value)
    assert trace is not None and "in _raise_deep" in trace and "from deep inside the child" in trace
    try:
        raise ProbeError("the parent's own sentence") from caught.value
    except ProbeError as parents:
        assert child_traceback(parents) == trace
    assert child_traceback(ProbeError("no child took part")) is None


def _two_messages_then(value: int) -> int:
    send_progress("first")
    send_progress("second")
    return value


def test_child_messages_arrive_before_the_result() -> None:
    messages: list[object] = []
    assert run_in_child(_two_messages_then, 7, timeout=60, on_message=messages.append) == 7
    assert messages == ["first", "second"]


@pytest.mark.slow
def test_estimate_probe_of_a_tiny_model_is_sane() -> None:
    device = DeviceSpec(name="Small card", total_memory_bytes=1300 << 20)  # ~220 MiB usable
    seen: list[Trial] = []
    result = run_probe(
        MLP, backend="estimate", device=device, gradient_checkpointing=False, progress=seen.append
    )
    assert result.backend == "estimate" and result.device == device
    assert result.stop_reason == "exact" and result.max_batch_size > 0
    assert seen == result.trials
    passing = [t for t in result.trials if t.ok]
    failing = [t for t in result.trials if not t.ok]
    assert max(t.batch_size for t in passing) == result.max_batch_size
    assert min(t.batch_size for t in failing) == result.max_batch_size + 1
    assert result.capacity_bytes is not None
    assert all(
        t.peak_reserved_bytes is not None and t.peak_reserved_bytes <= result.capacity_bytes for t in passing
    )
    assert result.memory_line is not None and result.memory_line.per_sample_bytes > 0
    assert result.facts is not None and result.facts.parameter_count > 0
    assert {"torch", "tuner"} <= set(result.versions)
    assert result.fingerprint == MLP.fingerprint()
