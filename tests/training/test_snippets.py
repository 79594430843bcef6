"""The plan page's snippets (`tuner.integrations.snippets`) run and agree with the integrations they
stand for: the plain loop, pasted with a model, an optimizer, a dataset and a loss function, makes
exactly the update of one full-batch step with `tuner.training.GradientAccumulator` (in every
precision, and with a transformers model's checkpointing switched on); the `TrainingArguments`
snippet constructs with the installed transformers and sets what `tuner.integrations.hf.apply_plan`
sets for the same plan."""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from tuner.integrations import hf, hf_arguments
from tuner.integrations.snippets import loop_snippet, nearest_even_plan, trainer_snippet
from tuner.results import Plan
from tuner.spec import DeviceSpec, WorkloadSpec, parse_workload

FEATURES = 6


MLP = {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 8, "num_layers": 1}}
GPT2: dict[str, Any] = {
    "n_layer": 1,
    "n_embd": 16,
    "n_head": 2,
    "n_positions": 16,
    "vocab_size": 32,
    "bos_token_id": 0,
}
GPT2 |= {"eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SEQ_LEN = 8


def _workload(precision: str = "fp32", optimizer: dict[str, str] | None = None) -> WorkloadSpec:
    return parse_workload(
        {
            "model": MLP,
            "inputs": {"kind": "features", "dim": FEATURES, "num_classes": 3},
            "precision": precision,
            "optimizer": optimizer or {},
        }
    )


def _plan(workload: WorkloadSpec | None = None, **fields: Any) -> Plan:
    workload = workload or _workload()
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


LossAndCount = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


def _run_loop(
    plan: Plan,
    dataset: list[dict[str, torch.Tensor]],
    model: nn.Module,
    loss_and_count: LossAndCount = _loss_and_count,
) -> int:
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
        "loss_and_count": loss_and_count,
    }
    exec(compile(code, "<loop snippet>", "exec"), namespace)
    return steps


def _reference(
    model: nn.Module, dataset: list[dict[str, torch.Tensor]], loss_and_count: LossAndCount = _loss_and_count
) -> nn.Module:
    """One SGD step on the mean loss over the whole dataset, at once."""
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    batch = torch.utils.data.default_collate(dataset)
    loss_sum, count = loss_and_count(reference, batch)
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


def _assert_same_parameters(got: nn.Module, want: nn.Module) -> None:
    for one, other in zip(got.parameters(), want.parameters(), strict=True):
        torch.testing.assert_close(one, other, rtol=1e-5, atol=1e-6)


# Without CUDA, the snippet's `torch.autocast("cuda")` and `GradScaler("cuda")` switch themselves
# off (saying so): the loop then runs in fp32 and must still make the full-batch update.
@pytest.mark.filterwarnings("ignore:.*CUDA is not available:UserWarning")
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_the_loop_snippet_runs_in_each_mixed_precision(precision: str) -> None:
    plan = _plan(_workload(precision))
    code = loop_snippet(plan)
    assert "torch.autocast(" in code and (("GradScaler" in code) == (precision == "fp16-mixed"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 3))
    dataset = _dataset(12)
    expected = _reference(model, dataset)
    assert _run_loop(plan, dataset, model) == 1
    _assert_same_parameters(model, expected)


def _token_loss_and_count(model: nn.Module, piece: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=piece["input_ids"]).logits[:, :-1]
    targets = piece["input_ids"][:, 1:]
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return loss, targets.numel()


# The snippet names the checkpointing switch every transformers release knows; 5.x warns it is an alias.
@pytest.mark.filterwarnings(
    "ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated"
)
def test_the_loop_snippet_switches_a_transformers_models_checkpointing_on() -> None:
    workload = parse_workload(
        {
            "model": {"family": "transformers", "config": {"model_type": "gpt2", **GPT2}},
            "inputs": {"kind": "tokens", "seq_len": SEQ_LEN},
            "precision": "fp32",
        }
    )
    plan = _plan(
        workload,
        effective_batch_size=6,
        micro_batch_size=2,
        accumulation_steps=3,
        gradient_checkpointing=True,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2))
    model.train()
    generator = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": torch.randint(0, 32, (SEQ_LEN,), generator=generator)} for _ in range(6)]
    expected = _reference(model, dataset, _token_loss_and_count)
    assert _run_loop(plan, dataset, model, _token_loss_and_count) == 1
    assert model.is_gradient_checkpointing
    _assert_same_parameters(model, expected)


def _snippet_keywords(code: str) -> dict[str, Any]:
    """The keywords the snippet passes to `TrainingArguments(...)`, as values."""
    call = next(
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "TrainingArguments"
    )
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg}


TRAINER_PLANS = {
    "even, checkpointing, bf16-mixed": {"workload": _workload("bf16-mixed"), "gradient_checkpointing": True},
    "even, fp16-mixed, fused adamw": {
        "workload": _workload("fp16-mixed", {"name": "adamw", "implementation": "fused"})
    },
    "uneven, adafactor": {
        "workload": _workload(optimizer={"name": "adafactor"}),
        "micro_batch_size": 5,
        "accumulation_steps": 3,
        "micro_batch_sizes": [5, 4, 3],
    },
    "eval micro-batch, checkpointing": {"eval_micro_batch_size": 24, "gradient_checkpointing": True},
    "uneven, eval micro-batch, sgd": {
        "workload": _workload(optimizer={"name": "sgd"}),
        "micro_batch_size": 5,
        "accumulation_steps": 3,
        "micro_batch_sizes": [5, 4, 3],
        "eval_micro_batch_size": 9,
    },
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing(_kwargs)?` is deprecated:FutureWarning")
@pytest.mark.parametrize("fields", TRAINER_PLANS.values(), ids=TRAINER_PLANS.keys())
def test_the_trainer_snippet_sets_what_apply_plan_sets(tmp_path: Path, fields: dict[str, Any]) -> None:
    plan = _plan(**fields)
    # `use_cpu`: this machine may have no GPU, and bf16 arguments refuse to build on a CPU without it.
    keywords = _snippet_keywords(trainer_snippet(plan)) | {"output_dir": str(tmp_path), "use_cpu": True}
    pasted = TrainingArguments(**keywords)
    # The Trainer takes one micro-batch size: an uneven plan's snippet is its nearest even split.
    even = nearest_even_plan(plan)
    assert even.micro_batch_sizes is None and even.effective_batch_size == plan.effective_batch_size
    assert even.micro_batch_size * even.accumulation_steps * even.world_size == plan.effective_batch_size
    assert even.micro_batch_size <= plan.micro_batch_size
    untouched = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    applied = hf.apply_plan(untouched, even)
    for name in hf.training_arguments_update(even, untouched):
        assert getattr(pasted, name) == getattr(applied, name), name
    assert pasted.per_device_eval_batch_size == (
        plan.eval_micro_batch_size or untouched.per_device_eval_batch_size
    )
    # The Trainer planned from these arguments would train in the plan's precision, with its optimizer.
    assert hf_arguments.trainer_precision(pasted) == plan.workload.precision
    optim = hf_arguments.optim_argument(plan.workload.optimizer)
    assert pasted.optim == (optim if optim is not None else untouched.optim)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing(_kwargs)?` is deprecated:FutureWarning")
def test_the_trainer_snippet_runs_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = _plan(_workload("fp16-mixed"), eval_micro_batch_size=24, gradient_checkpointing=True)
    namespace: dict[str, Any] = {}
    exec(compile(trainer_snippet(plan), "<trainer snippet>", "exec"), namespace)
    args = namespace["args"]
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 3)
    assert args.per_device_eval_batch_size == 24 and args.fp16 is True
    checkpointing = getattr(args, hf_arguments.RENAMED_CHECKPOINTING_NAMES[0], args.gradient_checkpointing)
    kwargs = (
        getattr(args, hf_arguments.RENAMED_CHECKPOINTING_NAMES[1], None) or args.gradient_checkpointing_kwargs
    )
    assert checkpointing is True and kwargs == hf_arguments.CHECKPOINTING_KWARGS
