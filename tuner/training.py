"""Apply a plan in a training loop: exact gradient accumulation (docs/training.md).

The textbook loop divides each micro-batch's *mean* loss by the number of accumulation steps.
That equals the big-batch gradient only when every micro-batch holds the same number of loss
items; with padding masks (or uneven micro-batches) it weights a token in a short micro-batch
more than a token in a long one. `GradientAccumulator` instead runs backward on each micro-batch's
*summed* loss, counts the items, and in `step()` divides the accumulated gradient by the total
count of the whole window (summed across ranks). The division happens once, after the counts are
known, so nothing about the window's items has to be known in advance.

Under DistributedDataParallel the gradients DDP hands back are the *average* over ranks of the
local sums, so `step()` multiplies by `world_size / global_count` instead of `1 / local_count`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed import ReduceOp

from tuner.block_checkpointing import checkpoint_blocks
from tuner.targets import count_targets, summed

__all__ = ["GradientAccumulator", "checkpoint_blocks", "count_targets", "summed", "summed_loss", "windows"]


class GradientAccumulator:
    """Exact gradient accumulation over a window of micro-batches.

    Per micro-batch call `backward(loss_sum, num_items, last=...)` with the loss *summed* over the
    micro-batch's items (tokens under the mask, or samples). After the window's last micro-batch
    call `step()`: one optimizer update whose gradient equals that of the mean loss over all items
    of the window, gradients zeroed afterwards.

    - DDP (`model` is a `DistributedDataParallel`): every `backward` but the one with `last=True`
      runs inside `model.no_sync()`. DDP decides during the *forward* whether the next backward
      all-reduces, so run forward and backward inside `with accumulator.micro_batch(last=...)`
      to get one gradient all-reduce per window; a forward run outside still gives the exact
      update, DDP merely all-reduces after every micro-batch. The item counts are all-reduced
      across the model's process group in `step()` (one small collective). If the window ends
      without a `last=True` micro-batch (a loader that ran out early), `step()` all-reduces the
      gradients itself: still exact, just without overlapping with backward.
    - fp16 (`scaler` is a `torch.amp.GradScaler`): backward runs on `scaler.scale(loss)`; `step()`
      calls `scaler.unscale_` before normalising and clipping, so `max_grad_norm` is in the
      gradient's true units, then `scaler.step` and `scaler.update` (an update with inf/NaN
      gradients is skipped by the scaler, as usual).
    - A final partial window (end of an epoch) is stepped, not dropped: call `step()` after its
      last `backward`; the count of that window is whatever it holds. `step()` with nothing
      accumulated is a no-op, so a loop may call it unconditionally at the end of an epoch.
    - A window whose global item count is 0 (everything masked) makes no update.
    - Models not wrapped in DDP are treated as one process: the count is local.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._process_group: Any = getattr(model, "process_group", None) if self._ddp else None
        self._context_last: bool | None = None
        self._items: torch.Tensor = torch.zeros((), dtype=torch.float64)
        self._loss_sum: torch.Tensor = torch.zeros((), dtype=torch.float64)
        self._micro_batches = 0
        self._synced = True
        self.last_loss: torch.Tensor | None = None
        """Mean loss (summed loss / item count, across ranks) of the last stepped window."""

    # -- the window ------------------------------------------------------------------------------

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches accumulated since the last `step()`."""
        return self._micro_batches

    @contextmanager
    def micro_batch(self, *, last: bool = False) -> Iterator[None]:
        """Run one micro-batch's forward and `backward` inside: under DDP, all but the window's
        last micro-batch then skip the gradient all-reduce (`model.no_sync()`); `backward`
        inside takes `last` from here."""
        previous = self._context_last
        self._context_last = last
        try:
            with self._sync_context(last):
                yield
        finally:
            self._context_last = previous

    def backward(
        self,
        loss_sum: torch.Tensor,
        num_items: int | torch.Tensor,
        *,
        last: bool = False,
        aux_loss: torch.Tensor | None = None,
    ) -> None:
        """Backward of one micro-batch.

        `loss_sum`: the loss summed (not averaged) over the micro-batch's `num_items` items.
        `num_items`: how many items that sum covers (an int, or a tensor such as `mask.sum()`,
        which is never synchronised to the host here).
        `last`: this is the window's last micro-batch; under DDP its backward all-reduces.
        `aux_loss`: a per-micro-batch *mean* loss such as an MoE load-balancing loss (already
        multiplied by its coefficient). It is weighted by `num_items` like the main loss, so the
        update carries the item-weighted mean of the micro-batches' auxiliary losses.
        """
        last = last or bool(self._context_last)
        items = self._as_count(num_items)
        objective = loss_sum if aux_loss is None else loss_sum + aux_loss * items.to(aux_loss.dtype)
        if self.scaler is not None:
            objective = self.scaler.scale(objective)
        with self._sync_context(last):
            objective.backward()
        self._synced = last or not self._ddp
        self._items = self._items + items
        self._loss_sum = self._loss_sum + loss_sum.detach().to(torch.float64)
        self._micro_batches += 1

    def step(self) -> torch.Tensor:
        """One optimizer update from the window, then zeroed gradients.

        Returns the total gradient norm (2-norm over all parameters, after normalisation and
        unscaling, before clipping) as a 0-dim float tensor on the parameters' device; call
        `.item()` to log it (that waits for the device). It is inf or NaN when an fp16 window
        overflowed (the scaler then skips the update). With nothing accumulated, returns 0 and
        does nothing.
        """
        device = self._device()
        if self._micro_batches == 0:
            return torch.zeros((), device=device)
        if not self._synced:
            self._all_reduce_gradients()
        totals = torch.stack([self._items.to(device), self._loss_sum.to(device)])
        world_size = 1
        if self._ddp:
            torch.distributed.all_reduce(totals, op=ReduceOp.SUM, group=self._process_group)
            world_size = torch.distributed.get_world_size(self._process_group)
        count, loss_sum = totals[0], totals[1]
        params = [p for p in self._parameters() if p.grad is not None]
        if bool(count == 0):
            # Every item was masked: the gradient is zero, and stepping would still move
            # momentum-based optimizers and weight decay.
            self.optimizer.zero_grad(set_to_none=True)
            self._reset_window()
            return torch.zeros((), device=device)
        self.last_loss = loss_sum / count
        if self.scaler is not None:
            # Unscale first: clipping must see the gradient in its true units.
            self.scaler.unscale_(self.optimizer)
        factor = world_size / count
        for param in params:
            assert param.grad is not None
            param.grad.mul_(factor.to(param.grad.dtype))
        norm = self._clip_or_measure(params)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._reset_window()
        return norm

    # -- helpers ---------------------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._items = torch.zeros((), dtype=torch.float64)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._micro_batches = 0
        self._synced = True

    def _as_count(self, num_items: int | torch.Tensor) -> torch.Tensor:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError("num_items must be a number or a one-element tensor")
            return num_items.detach().reshape(()).to(torch.float64)
        if num_items < 0:
            raise ValueError(f"num_items must not be negative, got {num_items}")
        return torch.tensor(float(num_items), dtype=torch.float64)

    def _sync_context(self, last: bool) -> AbstractContextManager[Any]:
        if self._ddp and not last:
            no_sync: AbstractContextManager[Any] = self.model.no_sync()
            return no_sync
        return nullcontext()

    def _parameters(self) -> Iterator[nn.Parameter]:
        for group in self.optimizer.param_groups:
            yield from group["params"]

    def _device(self) -> torch.device:
        for param in self._parameters():
            return param.device
        return torch.device("cpu")

    def _all_reduce_gradients(self) -> None:
        """What DDP would have done in the last backward: average the gradients over ranks."""
        world_size = torch.distributed.get_world_size(self._process_group)
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for group in by_kind.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat, op=ReduceOp.SUM, group=self._process_group)
            flat.div_(world_size)
            offset = 0
            for grad in group:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        self._synced = True

    def _clip_or_measure(self, params: list[nn.Parameter]) -> torch.Tensor:
        if not params:
            return torch.zeros((), device=self._device())
        if self.max_grad_norm is not None:
            return nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def windows(
    samples: Iterable[Any], sizes: Sequence[int], *, collate: Callable[[list[Any]], Any] | None = None
) -> Iterator[list[Any]]:
    """One optimizer step's micro-batches at a time: `samples` (a dataset, or any iterable of
    samples) cut into windows of `sum(sizes)` samples, each window into micro-batches of `sizes`
    (a plan's `micro_batch_sizes`, or `[micro_batch_size] * accumulation_steps`), each micro-batch
    collated (default: `torch.utils.data.default_collate`). The last window may be short (the end
    of an epoch): it keeps the micro-batches it can fill, the last one partial, so that it can
    still be stepped (`GradientAccumulator` normalises by what the window holds)."""
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"sizes must be positive micro-batch sizes, got {list(sizes)}")
    join = collate or torch.utils.data.default_collate
    window: list[Any] = []
    pending: list[Any] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == sizes[len(window)]:
            window.append(join(pending))
            pending = []
            if len(window) == len(sizes):
                yield window
                window = []
    if pending:
        window.append(join(pending))
    if window:
        yield window


def summed_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal language model's next-token cross-entropy *summed* over a micro-batch, and how many
    tokens it covers: what `GradientAccumulator.backward` takes.

    `batch` has `input_ids` and, optionally, `attention_mask` (padding is not predicted) and
    `labels` (default: the inputs; `ignore_index` marks tokens not to predict). The model returns
    logits, or an output with `.logits` (transformers). The mean of the returned sum over the
    count is the loss transformers computes for the same batch."""
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = ignore_index
    output = model(input_ids=input_ids, attention_mask=batch.get("attention_mask"))
    logits = output.logits if hasattr(output, "logits") else output
    targets = labels[:, 1:].reshape(-1)
    loss_sum = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets,
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss_sum, (targets != ignore_index).sum()
