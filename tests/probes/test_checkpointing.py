"""Gradient checkpointing on and off give the same gradients (fp32, same seed, dropout 0), and
it is really on: the checkpointed blocks run again in the backward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from probes.workloads import BuiltWorkload, build_workload, checkpoint_children
from tests.probes.factories import classifier
from tests.probes.tiny_specs import MODELS, tiny_spec


def first_block(workload: BuiltWorkload) -> nn.Module:
    """A module that checkpointing recomputes: a repeated block, or a top-level child."""
    model: Any = workload.model
    if hasattr(model, "blocks"):
        return model.blocks[0]  # builtin
    if hasattr(model, "transformer"):
        return model.transformer.h[0]  # gpt2
    if hasattr(model, "model"):
        return model.model.layers[0]  # llama, mixtral
    return model[0]  # the python classifier: its first Linear, wrapped as a top-level child


def gradients_and_block_calls(label: str, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    workload = build_workload(tiny_spec(label), gradient_checkpointing=checkpointing, seed=3)
    batch = workload.make_batch(4)
    block = first_block(workload)
    calls = 0
    forward = block.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    block.forward = counting_forward  # counts the recomputation too, which bypasses module hooks
    loss = workload.loss(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in workload.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, calls


@pytest.mark.parametrize("label", sorted(MODELS))
def test_checkpointing_gives_the_same_gradients(label: str) -> None:
    loss_off, grads_off, calls_off = gradients_and_block_calls(label, checkpointing=False)
    loss_on, grads_on, calls_on = gradients_and_block_calls(label, checkpointing=True)
    assert (calls_off, calls_on) == (1, 2), "the block should run again in the backward pass"
    assert loss_on == loss_off
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == len(
        list(build_workload(tiny_spec(label)).model.parameters())
    )
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpointing_is_off_outside_training() -> None:
    workload = build_workload(tiny_spec("decoder"), gradient_checkpointing=True)
    workload.model.eval()
    calls = 0
    block = first_block(workload)
    block.register_forward_hook(lambda *_: None)
    forward = block.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    block.forward = counting_forward
    workload.loss(workload.make_batch(2)).backward()
    assert calls == 1


def test_top_level_children_with_parameters_are_wrapped_once() -> None:
    model = classifier()
    names_before = list(model.state_dict())
    assert checkpoint_children(model) == 4  # three Linear layers and the BatchNorm; not the ReLUs
    assert checkpoint_children(model) == 0  # already wrapped
    assert list(model.state_dict()) == names_before  # parameter names unchanged
    out = model(torch.randn(4, 16))
    assert out.shape == (4, 10)
