"""`run_probe`'s child-process orchestration on CPU: real spawned children that abort, hang or
raise; the probe fails with a clear message and this process carries on."""

from __future__ import annotations

import os

import pytest

from probes.child import run_in_child, send_progress
from probes.probe import run_probe
from tests.unit.synthetic_devices import DEVICES_BY_NAME
from tuner.errors import DeviceRequiredError, ModelBuildError, ProbeError
from tuner.search_types import Trial
from tuner.spec import DeviceSpec, WorkloadSpec, parse_workload

FAKES = "tests.probes.fake_backends"
MLP = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 2}},
        "inputs": {"kind": "features", "dim": 512, "num_classes": 10},
        "precision": "fp32",
    }
)


def _probe(factory: str, **kwargs: object) -> object:
    return run_probe(
        MLP,
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
    assert seen == result.trials  # type: ignore[attr-defined]
    assert result.max_batch_size == DEVICES_BY_NAME["gpt2-like linear"].true_max  # type: ignore[attr-defined]


def test_verification_steps_down_until_the_answer_holds() -> None:
    result = _probe("synthetic", verify_steps=20)
    true_max = DEVICES_BY_NAME["gpt2-like linear"].true_max
    assert result.max_batch_size == true_max - 2  # type: ignore[attr-defined]
    assert result.verified_steps == 20  # type: ignore[attr-defined]
    tried = [v["batch_size"] for v in result.extra["verification"]]  # type: ignore[attr-defined]
    assert tried == [true_max, true_max - 1, true_max - 2]


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
        max_batch_size=64,
    )
    assert (result.max_batch_size, result.stop_reason) == (0, "nothing_fits")


@pytest.mark.slow
def test_a_model_that_cannot_be_built_keeps_its_error_code() -> None:
    broken = WorkloadSpec.model_validate(
        {
            "model": {"family": "transformers", "config": {"model_type": "no-such-model"}},
            "inputs": {"kind": "tokens", "seq_len": 8},
        }
    )
    with pytest.raises(ProbeError) as caught:
        run_probe(
            broken,
            backend="estimate",
            device=DeviceSpec(name="card", total_memory_bytes=1 << 30),
            gradient_checkpointing=False,
            timeout=120,
        )
    assert caught.value.code == ModelBuildError.code


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
    device = DeviceSpec(name="Tiny card", total_memory_bytes=1 << 30)
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
