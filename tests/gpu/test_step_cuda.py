"""The builders and the canonical step on a real GPU (skipped without CUDA; run by
scripts/gpu_check.sh): every family and precision with fused optimizers, checkpointing saving
memory, and MoE memory that does not depend on the routing."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from probes.step import run_train_steps  # noqa: E402
from probes.workloads import build_workload  # noqa: E402
from tests.probes.tiny_specs import MODELS, PRECISIONS, tiny_spec  # noqa: E402
from tuner.settings import get_settings  # noqa: E402
from tuner.spec import parse_workload  # noqa: E402


@pytest.fixture(autouse=True)
def _allow_test_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "tests")  # the `python` family's factories
    get_settings.cache_clear()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("label", sorted(MODELS))
def test_two_fused_steps_on_the_gpu(label: str, precision: str) -> None:
    spec = tiny_spec(label, precision=precision, optimizer={"name": "adamw", "implementation": "fused"})
    workload = build_workload(spec, device="cuda")
    assert {p.device.type for p in workload.model.parameters()} == {"cuda"}
    optimizer = workload.make_optimizer()
    report = run_train_steps(workload, 4, optimizer=optimizer, synchronize=torch.cuda.synchronize)
    assert all(loss is not None and math.isfinite(loss) for loss in report.losses)
    assert len(optimizer.state) > 0


def peak_bytes(spec_data: dict, batch_size: int, *, checkpointing: bool = False, seed: int = 0) -> int:
    workload = build_workload(
        parse_workload(spec_data), device="cuda", gradient_checkpointing=checkpointing, seed=seed
    )
    optimizer = workload.make_optimizer()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run_train_steps(workload, batch_size, optimizer=optimizer, synchronize=torch.cuda.synchronize)
    peak = int(torch.cuda.max_memory_allocated())
    del workload, optimizer
    torch.cuda.empty_cache()
    return peak


DECODER = {
    "model": {
        "family": "builtin",
        "name": "decoder",
        "kwargs": {
            "vocab_size": 8000,
            "hidden_size": 256,
            "num_layers": 6,
            "num_heads": 4,
            "max_seq_len": 1024,
        },
    },
    "inputs": {"kind": "tokens", "seq_len": 1024},
    "precision": "bf16-mixed",
}


def test_checkpointing_lowers_the_peak() -> None:
    assert peak_bytes(DECODER, 8, checkpointing=True) < 0.8 * peak_bytes(DECODER, 8)


def test_moe_peak_does_not_depend_on_the_routing() -> None:
    moe = {
        **DECODER,
        "model": {**DECODER["model"], "kwargs": {**DECODER["model"]["kwargs"], "use_moe": True}},
    }
    peaks = {peak_bytes(moe, 4, seed=seed) for seed in (0, 1, 2)}
    assert len(peaks) == 1, peaks
