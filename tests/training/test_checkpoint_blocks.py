"""Checkpointing a model that refuses transformers' switch: its repeated blocks, found and wrapped
in place; the same gradients; and under `auto`, a model that cannot be checkpointed at all still
gets its plan (without that choice, saying so)."""

from __future__ import annotations

import pytest
import torch

from tests.training.custom_models import tiny_mind
from tuner import plan_for
from tuner.block_checkpointing import CheckpointedForward, checkpoint_blocks, find_blocks
from tuner.spec import DeviceSpec

SMALL = {"hidden_size": 64, "vocab_size": 256, "max_position_embeddings": 256}
CARD = DeviceSpec(name="Test GPU 3GiB (checkpoint blocks)", total_memory_bytes=3 * 2**30)


def test_the_blocks_are_the_layers_not_an_experts_list() -> None:
    model = tiny_mind(use_moe=True, num_hidden_layers=3, **SMALL)
    found = find_blocks(model)
    assert found is not None and found[0] == "model.layers" and len(found[1]) == 3


def test_checkpointed_blocks_give_the_same_gradients_and_state_dict() -> None:
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = tiny_mind(use_moe=True, num_hidden_layers=2, **SMALL).double()
        keys = list(model.state_dict())
        if checkpointed:
            assert checkpoint_blocks(model) == "model.layers"
            assert checkpoint_blocks(model) == "model.layers"  # a second call wraps nothing again
            assert all(isinstance(block.forward, CheckpointedForward) for block in model.model.layers)
            assert not isinstance(model.model.layers[0].forward.forward, CheckpointedForward)
            assert list(model.state_dict()) == keys
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=1e-12)


def test_a_model_without_repeated_blocks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no nn\.ModuleList of repeated blocks"):
        checkpoint_blocks(tiny_mind(num_hidden_layers=1, **SMALL))


@pytest.mark.slow
def test_auto_drops_a_choice_the_model_cannot_be_built_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_SERVER", raising=False)
    # One layer: no stack of blocks to checkpoint, and the model refuses transformers' switch.
    plan = plan_for(tiny_mind(num_hidden_layers=1, **SMALL), effective_batch_size=32, device=CARD, inputs=64)
    assert set(plan.max_micro_batch_size) == {"off"} and not plan.gradient_checkpointing
    assert any(h.startswith("Checkpointing on was not considered") for h in plan.hints)
