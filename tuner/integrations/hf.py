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
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tuner.errors import PlanError
from tuner.results import Plan

__all__ = ["apply_plan", "plan_for_trainer", "training_arguments_update"]

_CHECKPOINTING_KWARGS = {"use_reentrant": False}


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
    if getattr(args, "bf16", False):
        precision = "bf16-mixed"
    elif getattr(args, "fp16", False):
        precision = "fp16-mixed"
    else:
        precision = "fp32"
    plan_for_kwargs.setdefault("precision", precision)
    plan_for_kwargs.setdefault("world_size", world_size)
    return plan_for(model, effective_batch_size=effective_batch_size, keeps_outputs=False, **plan_for_kwargs)


def _evaluates(args: Any) -> bool:
    strategy = getattr(args, "eval_strategy", getattr(args, "evaluation_strategy", "no"))
    return str(getattr(strategy, "value", strategy)) != "no" or bool(getattr(args, "do_eval", False))


def training_arguments_update(plan: Plan, args: Any) -> dict[str, Any]:
    """The fields of `args` (a `TrainingArguments`) that `plan` sets, by their names in this
    transformers version (`activation_checkpointing` since v5, `gradient_checkpointing` before)."""
    if plan.micro_batch_sizes:
        raise PlanError(
            f"The plan uses uneven micro-batches {plan.micro_batch_sizes}, which the Trainer cannot "
            "express: ask for a plan with allow_uneven_micro_batches off, or use GradientAccumulator."
        )
    names = {field.name for field in dataclasses.fields(args)}
    switch, kwargs_name = (
        ("activation_checkpointing", "activation_checkpointing_kwargs")
        if "activation_checkpointing" in names
        else ("gradient_checkpointing", "gradient_checkpointing_kwargs")
    )
    update: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
        switch: plan.gradient_checkpointing,
    }
    if plan.eval_micro_batch_size is not None:
        update["per_device_eval_batch_size"] = plan.eval_micro_batch_size
    if switch == "activation_checkpointing":
        update["gradient_checkpointing"] = None  # the deprecated alias must not override the new name
    if plan.gradient_checkpointing and not getattr(args, kwargs_name, None):
        update[kwargs_name] = dict(_CHECKPOINTING_KWARGS)
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
