"""The fake-tensor trace against the same step on real CPU tensors, and the CUDA kernels and
autocast policies the emulation picks. The emulation is process-global, so every check that
needs it runs in a child process; the test process itself stays unpatched."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from probes.child import run_in_child
from probes.estimate import emulation
from tests.probes.tiny_specs import FEATURES, SEQ, VOCAB, tiny_spec
from tuner.spec import WorkloadSpec, parse_workload

# Module-scoped fixtures start before the per-test allowlist fixture of conftest.py.
FACTORY_ENV = {"TUNER_ALLOWED_FACTORY_PACKAGES": "tests"}

# (family label, precision, gradient checkpointing): every family of tests/probes/tiny_specs.py,
# every precision, checkpointing on where the family has blocks to recompute.
EQUALITY_CASES: list[tuple[str, str, bool]] = [
    ("mlp", "bf16-mixed", False),
    ("cnn", "fp32", False),
    ("cnn", "bf16-mixed", True),
    ("decoder", "bf16-mixed", False),
    ("decoder", "bf16-mixed", True),
    ("decoder-learned", "fp16-mixed", False),
    ("decoder-moe", "bf16-mixed", False),
    ("gpt2", "bf16-mixed", False),
    ("gpt2", "fp32", True),
    ("llama", "bf16-mixed", False),
    ("llama", "bf16", True),
    ("mixtral", "bf16", False),
    ("python", "fp16-mixed", False),
]

GPT2_WITH_DROPOUT = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": SEQ,
    "vocab_size": VOCAB,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def gpt2_with_dropout(precision: str) -> WorkloadSpec:
    return parse_workload(
        {
            "model": {"family": "transformers", "config": GPT2_WITH_DROPOUT},
            "inputs": {"kind": "tokens", "seq_len": SEQ},
            "precision": precision,
        }
    )


def _fake_and_real_peaks(cases: list[tuple[str, str, bool]]) -> dict[tuple[str, str, bool], tuple[int, int]]:
    from probes.estimate.trace import trace_peak

    emulation.install_cuda_emulation()
    peaks = {}
    for label, precision, checkpointing in cases:
        spec = tiny_spec(label, precision=precision)
        fake = trace_peak(spec, 3, gradient_checkpointing=checkpointing)
        real = trace_peak(spec, 3, gradient_checkpointing=checkpointing, real_tensors=True)
        peaks[(label, precision, checkpointing)] = (fake.traced_peak_bytes, real.traced_peak_bytes)
    return peaks


@pytest.fixture(scope="module")
def fake_and_real_peaks() -> dict[tuple[str, str, bool], tuple[int, int]]:
    # One child for every case: the imports dominate a tiny model's trace.
    peaks: dict[tuple[str, str, bool], tuple[int, int]] = run_in_child(
        _fake_and_real_peaks, EQUALITY_CASES, timeout=600, what="fake/real comparison", env=FACTORY_ENV
    )
    return peaks


@pytest.mark.slow
@pytest.mark.parametrize("case", EQUALITY_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'ckpt' if c[2] else 'plain'}")
def test_fake_trace_peak_equals_real_cpu_peak(
    case: tuple[str, str, bool], fake_and_real_peaks: dict[tuple[str, str, bool], tuple[int, int]]
) -> None:
    fake, real = fake_and_real_peaks[case]
    assert real > 0
    assert fake == real


def _input_kinds_seen(real_tensors: bool) -> set[str]:
    """The tensor classes a python model's forward received in one trace."""
    from probes.estimate.trace import trace_peak
    from tests.probes import factories

    spec = parse_workload(
        {
            "model": {"family": "python", "factory": "tests.probes.factories:records_input_kind"},
            "inputs": FEATURES,
        }
    )
    factories.SEEN_INPUT_TYPES.clear()
    trace_peak(spec, 2, real_tensors=real_tensors)
    return set(factories.SEEN_INPUT_TYPES)


def _traced_ops_and_dtypes() -> dict[str, Any]:
    from probes.estimate.trace import trace_peak
    from probes.estimate.tracker import rounded
    from probes.workloads import build_workload

    emulation.install_cuda_emulation()
    input_kinds = {"fake": _input_kinds_seen(False), "real": _input_kinds_seen(True)}
    bf16 = trace_peak(gpt2_with_dropout("bf16-mixed"), 2, record_ops=True)
    fp32 = trace_peak(gpt2_with_dropout("fp32"), 2, record_ops=True)
    grouped = trace_peak(tiny_spec("llama", precision="bf16-mixed"), 2, record_ops=True)
    model = build_workload(gpt2_with_dropout("bf16-mixed")).model
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    weight = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {
            "softmax": x.softmax(-1).dtype,
            "layer_norm": torch.nn.functional.layer_norm(x, (8,)).dtype,
            "pow": x.pow(3).dtype,
            "sum": x.sum().dtype,
            "linear": torch.nn.functional.linear(x.float(), weight).dtype,
            "addcmul": torch.addcmul(x, x, x.float()).dtype,
        }
    return {
        "installed": emulation.installed(),
        "bf16": bf16,
        "fp32": fp32,
        "grouped": grouped,
        "parameter_bytes": sum(rounded(p.untyped_storage().nbytes()) for p in model.parameters())
        + sum(rounded(b.untyped_storage().nbytes()) for b in model.buffers()),
        "dtypes": dtypes,
        "input_kinds": input_kinds,
    }


@pytest.fixture(scope="module")
def traced() -> dict[str, Any]:
    result: dict[str, Any] = run_in_child(
        _traced_ops_and_dtypes, timeout=300, what="op-list trace", env=FACTORY_ENV
    )
    return result


def test_the_real_tensor_trace_is_not_a_second_fake_trace(traced: dict[str, Any]) -> None:
    """Fake peak == real peak only means something if the two traces differ in kind: the fake
    trace hands the model fake tensors, `real_tensors=True` hands it real CPU tensors."""
    assert traced["input_kinds"] == {"fake": {"FakeTensor"}, "real": {"Tensor"}}


def test_bf16_trace_takes_the_cuda_kernels(traced: dict[str, Any]) -> None:
    ops = set(traced["bf16"].ops)
    assert {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"} <= ops
    assert {"native_dropout", "native_dropout_backward"} <= ops
    # Not CPU's paths: the math attention (which saves the score matrix) and the float mask.
    assert "_scaled_dot_product_attention_math" not in ops
    assert "_scaled_dot_product_flash_attention_for_cpu" not in ops
    assert "bernoulli" not in ops


def test_fp32_takes_memory_efficient_attention(traced: dict[str, Any]) -> None:
    ops = set(traced["fp32"].ops)
    assert "_scaled_dot_product_efficient_attention" in ops
    assert "_scaled_dot_product_flash_attention" not in ops


def test_grouped_query_attention_takes_flash_without_repeating_heads(traced: dict[str, Any]) -> None:
    ops = set(traced["grouped"].ops)
    assert "_scaled_dot_product_flash_attention" in ops
    assert "_scaled_dot_product_attention_math" not in ops


def test_child_runs_cuda_autocast_policies(traced: dict[str, Any]) -> None:
    assert traced["installed"] is True
    assert traced["dtypes"] == {
        "softmax": torch.float32,
        "layer_norm": torch.float32,
        "pow": torch.float32,
        "sum": torch.float32,
        "linear": torch.bfloat16,
        "addcmul": torch.float32,
    }


def test_test_process_is_never_patched(traced: dict[str, Any]) -> None:
    assert traced["installed"] is True
    assert not emulation.installed()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16  # CPU autocast's own policy, untouched


def test_report_splits_the_peak_into_categories(traced: dict[str, Any]) -> None:
    report = traced["bf16"]
    assert sum(report.categories.values()) == report.traced_peak_bytes
    assert report.categories["parameters"] == traced["parameter_bytes"]
    # The peak of the second iteration holds the AdamW state made by the first step.
    assert report.peak_iteration == 1
    assert report.categories["optimizer_state"] >= 2 * traced["parameter_bytes"] * 0.9
    assert report.peak_phase in ("forward", "backward", "optimizer")
    assert report.peak_by_phase[report.peak_phase] == report.traced_peak_bytes
    assert report.peak_reserved_bytes >= report.peak_allocated_bytes > report.traced_peak_bytes


def _traced_peaks_by_loop_shape(batch_size: int) -> tuple[int, int]:
    from probes.estimate.trace import trace_step

    emulation.install_cuda_emulation()
    peaks = []
    for keeps in (True, False):
        spec = parse_workload(
            {
                "model": {"family": "transformers", "config": {"model_type": "gpt2", "n_positions": 1024}},
                "inputs": {"kind": "tokens", "seq_len": 1024},
                "precision": "bf16-mixed",
                "loop": {"keeps_outputs": keeps},
            }
        )
        peaks.append(trace_step(spec, batch_size).peak_bytes)
    return peaks[0], peaks[1]


@pytest.mark.slow
def test_a_loop_that_keeps_its_outputs_holds_the_logits_through_backward() -> None:
    kept, released = run_in_child(_traced_peaks_by_loop_shape, 8, timeout=600, what="GPT-2 traces")
    logits = 8 * 1024 * 50257 * 2  # b × seq × vocab, bf16
    assert kept - released == pytest.approx(logits, rel=0.01)
