"""The code that applies a plan, as the plan page shows it for pasting: a plain PyTorch loop with
`tuner.training.GradientAccumulator` (`loop_snippet`) and Hugging Face `TrainingArguments`
(`trainer_snippet`).

Each snippet is written from what the integration it stands for sets, so that pasting it does
what calling the integration would: the Trainer's keywords are those `tuner.integrations.hf`
sets (`tuner.integrations.hf_arguments.plan_arguments`), and its precision flag, optimizer name
and checkpointing keywords come from the same module. Nothing here imports torch, transformers
or the `plan_for` facade: the API process renders the page without them.

User text (a model's or a device's name) lands only in comments, flattened to one line first, so
that pasting a snippet never runs a name as code.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tuner.integrations import hf_arguments
from tuner.planner import divisors_up_to
from tuner.results import Plan, split_formula
from tuner.spec import Precision

__all__ = ["loop_snippet", "trainer_snippet"]

_AUTOCAST_DTYPES: dict[Precision, str] = {"bf16-mixed": "torch.bfloat16", "fp16-mixed": "torch.float16"}


def _comment_safe(text: str, limit: int = 120) -> str:
    """User text placed in a Python comment of a snippet: one line, printable, bounded (a
    newline in a model name must not turn into code when the snippet is pasted)."""
    flat = re.sub(r"[^\x20-\x7e\u00a0-\uffff]", " ", text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _literal(value: Any) -> str:
    """Python source for a keyword's value, strings in double quotes like the rest of a snippet."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(key)}: {_literal(item)}" for key, item in value.items()) + "}"
    return repr(value)


def _heading(plan: Plan) -> str:
    return f"# Plan {plan.id}: {_comment_safe(plan.workload.describe())} on {_comment_safe(plan.device.name)}"


def loop_snippet(plan: Plan) -> str:
    """A plain training loop that applies the plan with `tuner.training.GradientAccumulator`."""
    scaler = plan.workload.precision == "fp16-mixed"
    scaler_argument = ", scaler=scaler" if scaler else ""
    lines = [
        _heading(plan),
        f"# effective batch {plan.effective_batch_size} = {split_formula(plan)}"
        " (micro × accumulation × world)",
        "import torch",
        "from tuner.training import GradientAccumulator",
        "",
        *_split_constants(plan),
        "",
        *_model_setup(plan),
        *(['scaler = torch.amp.GradScaler("cuda")'] if scaler else []),
        f"accumulator = GradientAccumulator(model, optimizer{scaler_argument}, max_grad_norm=1.0)",
        "loader = torch.utils.data.DataLoader(dataset, batch_size=sum(MICRO_BATCH_SIZES), shuffle=True)",
        "",
        "",
        "def micro_batches(batch, sizes):",
        "    # Samples along dim 0; the epoch's short last batch gives fewer, smaller pieces.",
        "    total, start = len(next(iter(batch.values()))), 0",
        "    for size in sizes:",
        "        if start < total:",
        "            yield {key: value[start : start + size] for key, value in batch.items()}",
        "        start += size",
        "",
        "",
        "for batch in loader:",
        "    pieces = list(micro_batches(batch, MICRO_BATCH_SIZES))",
        "    for index, piece in enumerate(pieces):",
        "        last = index == len(pieces) - 1",
        "        with accumulator.micro_batch(last=last):",
        *_forward(plan),
        "            accumulator.backward(loss_sum, num_items, last=last)",
        "    accumulator.step()  # exact: the mean over every item of the window",
    ]
    return "\n".join(lines)


def _split_constants(plan: Plan) -> list[str]:
    """The micro-batch sizes of one optimizer step per rank, as constants the loop reads."""
    if plan.micro_batch_sizes:
        per_rank = plan.effective_batch_size // plan.world_size
        return [
            f"MICRO_BATCH_SIZES = {plan.micro_batch_sizes}  # one optimizer step per rank: {per_rank} samples"
        ]
    return [
        f"MICRO_BATCH_SIZE = {plan.micro_batch_size}",
        f"ACCUMULATION_STEPS = {plan.accumulation_steps}",
        "MICRO_BATCH_SIZES = [MICRO_BATCH_SIZE] * ACCUMULATION_STEPS",
    ]


def _model_setup(plan: Plan) -> list[str]:
    """Checkpointing as the probes measured it, and how the ranks hold the model."""
    lines = []
    if plan.gradient_checkpointing:
        if plan.workload.model.family == "transformers":
            lines.append(
                "model.gradient_checkpointing_enable("
                f"gradient_checkpointing_kwargs={_literal(hf_arguments.CHECKPOINTING_KWARGS)})"
            )
        else:
            keywords = ", ".join(
                f"{name}={value!r}" for name, value in hf_arguments.CHECKPOINTING_KWARGS.items()
            )
            lines.append(f"# checkpoint each block: torch.utils.checkpoint.checkpoint(block, x, {keywords})")
    if plan.parallelism.strategy == "fsdp":
        lines.append(
            f"# {plan.world_size} ranks: fully_shard each block, then the model, as the plan assumed "
            f"({plan.parallelism.describe(plan.world_size)}); give the loader a DistributedSampler"
        )
    elif plan.world_size > 1:
        lines.append(
            f"# {plan.world_size} ranks: wrap the model in DistributedDataParallel and give the loader a "
            "DistributedSampler"
        )
    return lines


def _forward(plan: Plan) -> list[str]:
    """One piece's forward and summed loss, under the plan's autocast where it has one."""
    loss = [
        "# the loss SUMMED over the piece's items (tokens under the mask, or samples)",
        "loss_sum, num_items = loss_and_count(model, piece)",
    ]
    dtype = _AUTOCAST_DTYPES.get(plan.workload.precision)
    if dtype is None:
        return [" " * 12 + line for line in loss]
    return [f'            with torch.autocast("cuda", dtype={dtype}):', *(" " * 16 + line for line in loss)]


def nearest_even_plan(plan: Plan) -> Plan:
    """`plan` with one micro-batch size, for the Trainer: an uneven window becomes the largest
    even micro-batch up to the plan's that divides the per-rank batch (the same effective batch in
    more steps); an even plan is returned as it is."""
    if not plan.micro_batch_sizes:
        return plan
    per_rank = plan.effective_batch_size // plan.world_size
    micro = max(divisors_up_to(per_rank, plan.micro_batch_size))
    return plan.model_copy(
        update={"micro_batch_size": micro, "accumulation_steps": per_rank // micro, "micro_batch_sizes": None}
    )


def trainer_snippet(plan: Plan) -> str:
    """Hugging Face `TrainingArguments` that apply the plan as `tuner.integrations.hf.apply_plan`
    would (an uneven plan by its `nearest_even_plan`: the Trainer takes one micro-batch size), by
    the checkpointing names every transformers release accepts, with the precision flag and the
    optimizer the plan was measured with."""
    lines = [_heading(plan)]
    even = nearest_even_plan(plan)
    if even is not plan:
        lines.append(
            f"# The plan splits each window unevenly ({split_formula(plan)}); the Trainer needs one size:"
        )
        lines.append(
            f"# {even.micro_batch_size} × {even.accumulation_steps} reaches the same effective batch"
            " with more steps."
        )
    arguments: dict[str, Any] = {"output_dir": "output", **hf_arguments.plan_arguments(even)}
    precision = plan.workload.precision
    flag = hf_arguments.PRECISION_FLAGS.get(precision)
    if flag is not None:
        arguments[flag] = True
    optim = hf_arguments.optim_argument(plan.workload.optimizer)
    if optim is not None:
        arguments["optim"] = optim
    lines += ["from transformers import TrainingArguments", "", "args = TrainingArguments("]
    for name, value in arguments.items():
        renamed = (
            f"  # 5.x: {hf_arguments.RENAMED_CHECKPOINTING_NAMES[0]}"
            if name == hf_arguments.CHECKPOINTING_NAMES[0]
            else ""
        )
        lines.append(f"    {name}={_literal(value)},{renamed}")
    lines.append(")")
    if plan.world_size > 1:
        lines.append(f"# launch on {plan.world_size} processes: torchrun --nproc-per-node ... train.py")
    if precision == "bf16":
        lines.append("# bf16 weights: load the model with torch_dtype=torch.bfloat16")
    return "\n".join(lines)
