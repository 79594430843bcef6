"""Plan for the Hugging Face Trainer and apply a plan to `transformers.TrainingArguments`.

`plan_for_trainer` asks for the plan of the loop the Trainer runs: its `compute_loss` keeps only
the loss of the forward's output (`loop.keeps_outputs: false`, the logits die before backward),
in the precision the arguments name.

The plan gives the per-device micro-batch, the accumulation steps and whether to checkpoint
activations; `apply_plan` returns a new `TrainingArguments` with those three set (the original is
left as it was), and `per_device_eval_batch_size` where the plan has an eval micro-batch (planned
when the arguments evaluate: the Trainer's eval loop runs with the training state resident).
The Trainer normalises a causal-LM loss by the number of label tokens of the
whole accumulation window (`num_items_in_batch`), so its accumulation is exact in the sense of
docs/training.md for models that accept that argument, which the transformers LMs do.

The keywords themselves, by name, are `tuner.integrations.hf_arguments.plan_arguments`, which
the plan page's snippet (`tuner.integrations.snippets`) writes out too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tuner.errors import PlanError
from tuner.integrations.hf_arguments import (
    CHECKPOINTING_NAMES,
    RENAMED_CHECKPOINTING_NAMES,
    plan_arguments,
    trainer_precision,
)
from tuner.results import Plan

__all__ = ["apply_plan", "plan_for_trainer", "training_arguments_update"]


def plan_for_trainer(
    model: Any, args: Any, *, effective_batch_size: int | None = None, **plan_for_kwargs: Any
) -> Plan:
    """`tuner.plan_for` for `model` trained by a `Trainer` with `args` (`TrainingArguments`): the
    Trainer's loop shape, its precision (`bf16` → bf16-mixed, `fp16` → fp16-mixed, else fp32) and
    world size; the effective batch defaults to the one `args` gives now (per-device batch ×
    accumulation × world size). Where `args` evaluate (an `eval_strategy` other than `no`, or
    `do_eval`), the plan also has an eval micro-batch (`policy.eval`). Other keywords go to
    `plan_for`."""
    from tuner.integration import plan_for

    if "policy" not in plan_for_kwargs and _evaluates(args):
        plan_for_kwargs["policy"] = {"eval": True}
    world_size = getattr(args, "world_size", 1)
    world_size = world_size if isinstance(world_size, int) and world_size > 0 else 1
    if effective_batch_size is None:
        effective_batch_size = (
            int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * world_size
        )
    plan_for_kwargs.setdefault("precision", trainer_precision(args))
    plan_for_kwargs.setdefault("world_size", world_size)
    return plan_for(model, effective_batch_size=effective_batch_size, keeps_outputs=False, **plan_for_kwargs)


def _evaluates(args: Any) -> bool:
    strategy = getattr(args, "eval_strategy", getattr(args, "evaluation_strategy", "no"))
    return str(getattr(strategy, "value", strategy)) != "no" or bool(getattr(args, "do_eval", False))


def training_arguments_update(plan: Plan, args: Any) -> dict[str, Any]:
    """The fields of `args` (a `TrainingArguments`) that `plan` sets, by their names in this
    transformers version (`activation_checkpointing` since v5, `gradient_checkpointing` before);
    checkpointing keywords the caller set are kept."""
    names = {field.name for field in dataclasses.fields(args)}
    renamed = RENAMED_CHECKPOINTING_NAMES[0] in names
    checkpointing_names = RENAMED_CHECKPOINTING_NAMES if renamed else CHECKPOINTING_NAMES
    update = plan_arguments(
        plan,
        checkpointing_names=checkpointing_names,
        checkpointing_kwargs=not getattr(args, checkpointing_names[1], None),
    )
    if renamed:
        # The deprecated alias must not override the new name.
        update[CHECKPOINTING_NAMES[0]] = None
    return update


def apply_plan(args: Any, plan: Plan) -> Any:
    """A copy of `args` (a `transformers.TrainingArguments`) with the plan's per-device batch,
    accumulation steps and activation checkpointing. Warns nothing and changes nothing else; the
    learning rate stays the caller's."""
    if not dataclasses.is_dataclass(args) or isinstance(args, type):
        raise PlanError(f"apply_plan needs a TrainingArguments instance, got {type(args).__name__}.")
    world_size = getattr(args, "world_size", 1)
    if isinstance(world_size, int) and world_size != plan.world_size:
        raise PlanError(
            f"The plan is for {plan.world_size} process(es) but this run has {world_size}: ask for a plan "
            f"with world_size={world_size} to keep the effective batch at {plan.effective_batch_size}."
        )
    return dataclasses.replace(args, **training_arguments_update(plan, args))
