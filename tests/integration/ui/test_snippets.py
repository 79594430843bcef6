"""The plan page's snippets run: the plain loop, pasted with a model, an optimizer, a dataset and a
loss function, makes exactly the update of one full-batch step; the `TrainingArguments` snippet
constructs with the installed transformers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from api.routers.ui import loop_snippet, trainer_snippet
from tuner.results import Plan
from tuner.spec import DeviceSpec, parse_workload

FEATURES = 6


def _plan(**fields: Any) -> Plan:
    workload = parse_workload(
        {
            "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 8, "num_layers": 1}},
            "inputs": {"kind": "features", "dim": FEATURES, "num_classes": 3},
            "precision": "fp32",
        }
    )
    base: dict[str, Any] = {
        "id": 7,
        "fingerprint": workload.fingerprint(),
        "workload": workload,
        "device": DeviceSpec(name="Some GPU\nimport os  # a name with a newline", total_memory_bytes=1 << 30),
        "backend": "estimate",
        "effective_batch_size": 12,
        "world_size": 1,
        "micro_batch_size": 4,
        "accumulation_steps": 3,
        "gradient_checkpointing": False,
        "max_micro_batch_size": {"off": 5},
        "memory_budget_bytes": 1 << 29,
        "predicted_peak_bytes": 1 << 28,
    }
    return Plan(**{**base, **fields})


def _dataset(count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, FEATURES, generator=generator)
    labels = torch.randint(0, 3, (count,), generator=generator)
    return [{"inputs": inputs[i], "labels": labels[i]} for i in range(count)]


def _loss_and_count(model: nn.Module, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(piece["inputs"])
    return nn.functional.cross_entropy(logits, piece["labels"], reduction="sum"), len(piece["labels"])


def _run_loop(plan: Plan, dataset: list[dict[str, torch.Tensor]], model: nn.Module) -> int:
    """Run the pasted loop; returns how many optimizer steps it made."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = 0
    original_step = optimizer.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        return original_step(*args, **kwargs)

    optimizer.step = counted_step  # type: ignore[method-assign]
    code = loop_snippet(plan)
    namespace = {
        "model": model,
        "optimizer": optimizer,
        "dataset": dataset,
        "loss_and_count": _loss_and_count,
    }
    exec(compile(code, "<loop snippet>", "exec"), namespace)
    return steps


def _reference(model: nn.Module, dataset: list[dict[str, torch.Tensor]]) -> nn.Module:
    """One SGD step on the mean loss over the whole dataset, at once."""
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    batch = torch.utils.data.default_collate(dataset)
    loss_sum, count = _loss_and_count(reference, batch)
    (loss_sum / count).backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    optimizer.step()
    return reference


@pytest.mark.parametrize(
    "fields",
    [{}, {"micro_batch_size": 5, "accumulation_steps": 3, "micro_batch_sizes": [5, 4, 3]}],
    ids=["even", "uneven"],
)
def test_the_loop_snippet_makes_the_full_batch_update(fields: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 3))
    dataset = _dataset(12)
    expected = _reference(model, dataset)
    assert _run_loop(_plan(**fields), dataset, model) == 1
    for got, want in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_epochs_last_partial_window_is_stepped() -> None:
    model = nn.Sequential(nn.Linear(FEATURES, 3))
    assert _run_loop(_plan(), _dataset(14), model) == 2


def test_user_text_stays_inside_comments() -> None:
    for code in (loop_snippet(_plan()), trainer_snippet(_plan())):
        compile(code, "<snippet>", "exec")
        assert "\nimport os" not in code
        assert "# Plan 7: mlp on Some GPU import os  # a name with a newline" in code


@pytest.mark.slow
# The snippet uses the name every release accepts; transformers 5 warns that it is an alias.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_the_trainer_snippet_builds_training_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = _plan(micro_batch_size=5, accumulation_steps=3, micro_batch_sizes=[5, 4, 3])
    namespace: dict[str, Any] = {}
    exec(compile(trainer_snippet(plan), "<trainer snippet>", "exec"), namespace)
    args = namespace["args"]
    # The Trainer takes one size: the uneven window becomes the nearest even split of 12.
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 3)
    assert args.gradient_checkpointing is False
