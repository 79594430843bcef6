"""`python`-family factories for tests (`"tests.probes.factories:<name>"`, with `tests` allowed
through TUNER_ALLOWED_FACTORY_PACKAGES). Each is a real torch module; some misbehave on purpose."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def classifier(in_features: int = 16, hidden: int = 32, num_classes: int = 10) -> nn.Module:
    """Plain logits: the builder applies cross-entropy against the labels."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@dataclass
class LossOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class SelfScoringClassifier(nn.Module):
    """Takes `labels` and returns an object with `.loss`, as transformers models do. Its loss is
    the cross-entropy plus 10, so a test can tell it was used rather than recomputed."""

    offset = 10.0

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 32), nn.Tanh())
        self.head = nn.Linear(32, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> LossOutput:
        logits = self.head(self.body(features))
        loss = F.cross_entropy(logits.float(), labels) + self.offset if labels is not None else logits.sum()
        return LossOutput(loss=loss, logits=logits)


def self_scoring(in_features: int = 16, num_classes: int = 10) -> nn.Module:
    return SelfScoringClassifier(in_features, num_classes)


class TinyTokenModel(nn.Module):
    """Tokens in, (batch, seq, vocab) logits out: the builder applies the next-token loss."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.mix = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.mix(self.embed(input_ids)))
        return out


def token_model(vocab_size: int = 64, dim: int = 16) -> nn.Module:
    return TinyTokenModel(vocab_size, dim)


class ReadsValuesInForward(nn.Module):
    """Calls `.item()` in forward: a data-dependent op that fails under FakeTensorMode (the
    estimator's tests use it to see that failure reported)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layer(features)
        scale = float(logits.abs().max().item()) + 1.0
        return logits / scale


def item_in_forward(in_features: int = 16, num_classes: int = 10) -> nn.Module:
    return ReadsValuesInForward(in_features, num_classes)


def raises(message: str = "this factory always fails") -> nn.Module:
    raise RuntimeError(message)


def not_a_module() -> object:
    return {"weights": [1.0, 2.0]}


SEEN_INPUT_TYPES: list[str] = []
"""Class names of the tensors `RecordsInputKind.forward` received in this process."""


class RecordsInputKind(nn.Module):
    """Records the class of the tensor its forward receives (`FakeTensor` under a fake trace,
    `Tensor` on real tensors), so a test can tell which kind of trace ran."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        SEEN_INPUT_TYPES.append(type(features).__name__)
        out: torch.Tensor = self.layer(features)
        return out


def records_input_kind(in_features: int = 16, num_classes: int = 10) -> nn.Module:
    return RecordsInputKind(in_features, num_classes)


class LabelledOnly(nn.Module):
    """A forward that needs labels (no default): it returns its loss and nothing else, so an eval
    forward on the inputs alone cannot run it."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(features).float(), labels)


def labelled_only(in_features: int = 16, num_classes: int = 10) -> nn.Module:
    return LabelledOnly(in_features, num_classes)
