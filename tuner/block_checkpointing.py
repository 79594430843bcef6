"""Activation checkpointing for a model that has no switch of its own: each repeated block.

A custom-code model (MiniMind's `MiniMindForCausalLM`) inherits transformers'
`gradient_checkpointing_enable` but refuses it ("does not support activation checkpointing").
What a user does instead is what this does: find the model's stack of repeated blocks (the
`nn.ModuleList` of same-class children that holds most parameters: `model.layers`, `h`,
`blocks`) and run each block's `forward` through `torch.utils.checkpoint` (non-reentrant) while
training. The probe checkpoints a model this way, so a plan with checkpointing on is applied by
calling the same function in the training script:

    from tuner.training import checkpoint_blocks
    checkpoint_blocks(model)   # returns the blocks' path, e.g. "model.layers"

Parameter names and state dicts do not change (the forward is wrapped in place); under DDP,
call it before wrapping the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedForward", "checkpoint_blocks", "find_blocks"]


class CheckpointedForward:
    """A module's `forward`, recomputed in the backward pass while the module is training."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.module = module
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        return self.forward(*args, **kwargs)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: among its `nn.ModuleList`s of two or more children of one
    class, each holding parameters, the one with the most parameters; with its dotted path. None
    when the model has no such list."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = {type(child) for child in module}
        sizes = [sum(p.numel() for p in child.parameters()) for child in module]
        if len(classes) != 1 or not all(sizes):
            continue
        # An outer list (the layers) holds an inner one (a layer's experts): the outer has more.
        if best is None or sum(sizes) > best[0]:
            best = (sum(sizes), name, module)
    return None if best is None else (best[1], best[2])


def checkpoint_blocks(model: nn.Module) -> str:
    """Checkpoint each of the model's repeated blocks (see `find_blocks`); the blocks' path.
    Raises `ValueError` for a model without a stack of repeated blocks."""
    found = find_blocks(model)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks to checkpoint: wrap the "
            "forward of its expensive parts in torch.utils.checkpoint.checkpoint yourself."
        )
    path, blocks = found
    for block in blocks:
        if not isinstance(block.forward, CheckpointedForward):
            # An instance attribute shadows the class's `forward`, which `Module.__call__` looks up.
            setattr(block, "forward", CheckpointedForward(block, block.forward))  # noqa: B010
    return path
