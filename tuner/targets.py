"""What `GradientAccumulator.backward(loss_sum, num_items)` takes, from a model that averages its
own loss: how many targets that mean covers, and the sum it was the mean of.

A Hugging Face-style causal LM (transformers' own, MiniMind's) is given `labels` equal to its
inputs and shifts them inside `forward`: position t predicts label t + 1, so the first label of
each row is never a target. Its `res.loss` is the mean over `(labels[..., 1:] != -100)`, not over
`(labels != -100)`: counting the unshifted labels adds one target per row (more, with padding that
is not -100), and a window's gradient weighted by those counts is off by a few percent.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "count_targets", "summed"]

IGNORE_INDEX = -100
"""The label PyTorch's and transformers' cross-entropy skip."""


def count_targets(
    labels: torch.Tensor, *, shifted: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The number of targets a loss over `labels` averages (a 0-dim tensor; not synchronised).

    `shifted=True` (default): the model shifts the labels itself, as transformers' causal LMs and
    MiniMind's do, so the first position of each row is not a target: `(labels[..., 1:] !=
    ignore_index).sum()`. `shifted=False`: the labels are already the targets (a classifier, or a
    loop that shifted them): `(labels != ignore_index).sum()`."""
    targets = labels[..., 1:] if shifted else labels
    return (targets != ignore_index).sum()


def summed(mean_loss: torch.Tensor, num_items: int | torch.Tensor) -> torch.Tensor:
    """`mean_loss × num_items`, the summed loss a mean over `num_items` targets came from, and 0
    (not NaN) when there are none: a micro-batch whose labels are all `ignore_index` has a NaN mean
    (0 / 0), which `res.loss * 0` would carry into the window's loss. Its gradient is zero
    either way."""
    count = torch.as_tensor(num_items, device=mean_loss.device)
    return torch.where(count > 0, mean_loss * count.to(mean_loss.dtype), torch.zeros_like(mean_loss))
