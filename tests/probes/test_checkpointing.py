"""Gradient checkpointing on and off give the same gradients (fp32, same seed, dropout 0), and
it is really on: the checkpointed blocks' forward runs again in the backward pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from probes.workloads import build_workload, checkpoint_children
from tests.probes.factories import classifier
from tests.probes.tiny_specs import MODELS, tiny_spec


class OpCounter(TorchDispatchMode):
    """Counts the operations run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def loss_gradients_and_backward_ops(
    label: str, checkpointing: bool
) -> tuple[float, dict[str, torch.Tensor], int]:
    workload = build_workload(tiny_spec(label), gradient_checkpointing=checkpointing, seed=3)
    batch = workload.make_batch(4)
    loss = workload.loss(batch)
    counter = OpCounter()
    with counter:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in workload.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, counter.count


@pytest.mark.parametrize("label", sorted(MODELS))
def test_checkpointing_gives_the_same_gradients(label: str) -> None:
    loss_off, grads_off, ops_off = loss_gradients_and_backward_ops(label, checkpointing=False)
    loss_on, grads_on, ops_on = loss_gradients_and_backward_ops(label, checkpointing=True)
    # Really on: the checkpointed blocks' forward runs again inside the backward pass.
    assert ops_on > ops_off
    assert loss_on == loss_off
    parameter_count = len(list(build_workload(tiny_spec(label)).model.parameters()))
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == parameter_count
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, msg=lambda m, name=name: f"{name}: {m}")


def test_checkpointing_is_off_outside_training() -> None:
    ops = []
    for checkpointing in (False, True):
        workload = build_workload(tiny_spec("decoder"), gradient_checkpointing=checkpointing)
        workload.model.eval()
        loss = workload.loss(workload.make_batch(2))
        counter = OpCounter()
        with counter:
            loss.backward()
        ops.append(counter.count)
    assert ops[0] == ops[1]


def test_top_level_children_with_parameters_are_wrapped_once() -> None:
    model = classifier()
    names_before = list(model.state_dict())
    assert checkpoint_children(model) == 4  # three Linear layers and the BatchNorm; not the ReLUs
    assert checkpoint_children(model) == 0  # already wrapped
    assert list(model.state_dict()) == names_before  # parameter names unchanged
    out = model(torch.randn(4, 16))
    assert out.shape == (4, 10)
