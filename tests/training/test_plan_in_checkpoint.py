"""A plan saved in a training checkpoint (torch.save, weights-only torch.load) and resumed as the
same plan, for a custom-code model too, in a process that allows no factory packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.custom_models import tiny_mind
from tuner.integration import workload_for
from tuner.results import Plan
from tuner.spec import DeviceSpec

CARD = DeviceSpec(name="Test GPU 24GiB (checkpoint)", total_memory_bytes=24 << 30)


def a_plan() -> Plan:
    workload = workload_for(tiny_mind(hidden_size=64, max_position_embeddings=256), inputs=64)
    return Plan(
        id=7,
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=CARD,
        backend="estimate",
        effective_batch_size=256,
        world_size=2,
        micro_batch_size=32,
        accumulation_steps=4,
        gradient_checkpointing=True,
        max_micro_batch_size={"off": 20, "on": 41},
        memory_budget_bytes=int(CARD.total_memory_bytes * 0.95),
        predicted_peak_bytes=21 << 30,
        hints=["Turn on gradient checkpointing: ..."],
    )


def test_a_plan_survives_a_checkpoint_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_ALLOWED_FACTORY_PACKAGES", raising=False)
    plan = a_plan()
    model = torch.nn.Linear(4, 4)
    step = 1234
    torch.save({"model": model.state_dict(), "step": step, "plan": plan.to_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain JSON values load as weights
    resumed = Plan.from_dict(saved["plan"])
    assert resumed == plan
    assert resumed.workload.fingerprint() == plan.fingerprint
    # The resume arithmetic: samples each rank has consumed, the same under the same plan.
    per_rank = saved["step"] * resumed.effective_batch_size // resumed.world_size
    assert per_rank == step * resumed.micro_batch_size * resumed.accumulation_steps


def test_a_saved_plan_that_was_edited_is_refused() -> None:
    data = a_plan().to_dict()
    data["micro_batch_size"] = "thirty-two"
    with pytest.raises(ValueError, match="micro_batch_size"):
        Plan.from_dict(data)
