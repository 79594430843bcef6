"""`python`-family factories that break the probe child (or one of its choices) on purpose
(`"tests.integration.e2e.factories:<name>"`, allowed through TUNER_ALLOWED_FACTORY_PACKAGES=tests).

They run inside the probe's child process, when the model is built: an abort kills that child the
way a CUDA driver crash would; a hang holds it the way a deadlocked kernel would.
"""

from __future__ import annotations

import os
import time

from torch import nn


def aborts(in_features: int = 32, num_classes: int = 10) -> nn.Module:
    """Abort the process that builds the model (SIGABRT, no Python exception)."""
    os.abort()


def hangs(in_features: int = 32, num_classes: int = 10) -> nn.Module:
    """Never return (until the probe's timeout stops the child)."""
    while True:
        time.sleep(60)


def raises(in_features: int = 32, num_classes: int = 10) -> nn.Module:
    """Fail like a broken model definition: the spec's fault, not the service's."""
    raise ValueError("this model definition is broken")


class _NoCheckpointing(nn.Sequential):
    """A model that inherits a checkpointing switch but refuses it (as a custom-code
    `PreTrainedModel` does), with no stack of repeated blocks to checkpoint instead."""

    def gradient_checkpointing_enable(self, **_: object) -> None:
        raise ValueError(f"{type(self).__name__} does not support activation checkpointing")


def refuses_checkpointing(in_features: int = 32, num_classes: int = 10) -> nn.Module:
    """Builds and trains without checkpointing; cannot be built with it."""
    return _NoCheckpointing(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, num_classes))
