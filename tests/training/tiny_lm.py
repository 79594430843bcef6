"""A tiny token model and padded, uneven micro-batches for the accumulation tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 13
PAD = 0
IGNORE = -100


class TinyLM(nn.Module):
    """Embedding → tanh MLP → vocabulary logits: small, but every parameter gets a gradient."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def padded_batch(lengths: list[int], seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Right-padded token rows of the given true lengths."""
    rows = torch.full((len(lengths), seq_len), PAD, dtype=torch.long)
    for i, length in enumerate(lengths):
        rows[i, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
    return rows


def uneven_micro_batches(seed: int = 0) -> list[torch.Tensor]:
    """Four micro-batches with very different numbers of target tokens: 3, 41, 4 and 20."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [([2, 3], 12), ([12, 11, 10, 12], 12), ([5], 12), ([9, 2, 12], 12)]
    return [padded_batch(lengths, seq_len, generator) for lengths, seq_len in shapes]


def targets_of(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token targets; padding (and the last position) ignored."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    targets[targets == PAD] = IGNORE
    return targets


def summed_loss(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the real target tokens, and how many there are."""
    targets = targets_of(tokens)
    logits = model(tokens)
    loss = F.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((targets != IGNORE).sum())


def big_batch_update(model: nn.Module, micro_batches: list[torch.Tensor], lr: float) -> None:
    """The reference: one SGD step on the mean loss over every real token of the window."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    width = max(mb.shape[1] for mb in micro_batches)
    tokens = torch.cat([F.pad(mb, (0, width - mb.shape[1]), value=PAD) for mb in micro_batches])
    loss, count = summed_loss(model, tokens)
    (loss / count).backward()
    optimizer.step()


def max_abs_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((pa.detach() - pb.detach()).abs().max())
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )
