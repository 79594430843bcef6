"""What a plan sets in Hugging Face `TrainingArguments`, by name: one home for the keywords that
`tuner.integrations.hf.apply_plan` sets and the plan page's snippet writes out
(`tuner.integrations.snippets`), so that the two cannot drift apart.

Neither transformers nor the `plan_for` facade is imported here (`tuner.integrations.hf` imports
the facade for `plan_for_trainer`): the API process, which never imports probes nor torch, writes
the snippet from these.
"""

from __future__ import annotations

from typing import Any

from tuner.errors import PlanError
from tuner.results import Plan
from tuner.spec import OptimizerSpec, Precision

__all__ = [
    "CHECKPOINTING_KWARGS",
    "CHECKPOINTING_NAMES",
    "PRECISION_FLAGS",
    "RENAMED_CHECKPOINTING_NAMES",
    "optim_argument",
    "plan_arguments",
    "trainer_precision",
]

CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""How activations are recomputed: the non-reentrant checkpoint, the one the probes measure."""
CHECKPOINTING_NAMES = ("gradient_checkpointing", "gradient_checkpointing_kwargs")
"""The activation-checkpointing switch and its keywords by the names every transformers release
accepts (since 5.x as deprecated aliases of `RENAMED_CHECKPOINTING_NAMES`)."""
RENAMED_CHECKPOINTING_NAMES = ("activation_checkpointing", "activation_checkpointing_kwargs")
"""The same two by their names since transformers 5.x."""
PRECISION_FLAGS: dict[Precision, str] = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}
"""The `TrainingArguments` flag of each mixed precision the Trainer runs (`trainer_precision`)."""


def plan_arguments(
    plan: Plan,
    *,
    checkpointing_names: tuple[str, str] = CHECKPOINTING_NAMES,
    checkpointing_kwargs: bool = True,
) -> dict[str, Any]:
    """The `TrainingArguments` keywords that apply `plan`: the per-device micro-batch, the
    accumulation steps, the eval micro-batch where the plan has one, and activation checkpointing
    by `checkpointing_names` (switch, keywords), with `CHECKPOINTING_KWARGS` where the plan
    checkpoints and `checkpointing_kwargs` is set. Needs an even split: the Trainer takes one
    micro-batch size."""
    if plan.micro_batch_sizes:
        raise PlanError(
            f"The plan uses uneven micro-batches {plan.micro_batch_sizes}, which the Trainer cannot "
            "express: ask for a plan with allow_uneven_micro_batches off, or use GradientAccumulator."
        )
    switch, kwargs_name = checkpointing_names
    arguments: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation_steps,
    }
    if plan.eval_micro_batch_size is not None:
        arguments["per_device_eval_batch_size"] = plan.eval_micro_batch_size
    arguments[switch] = plan.gradient_checkpointing
    if plan.gradient_checkpointing and checkpointing_kwargs:
        arguments[kwargs_name] = dict(CHECKPOINTING_KWARGS)
    return arguments


def trainer_precision(args: Any) -> Precision:
    """The precision a `Trainer` with `args` trains in: the first of `PRECISION_FLAGS` set, else
    fp32."""
    return next(
        (precision for precision, flag in PRECISION_FLAGS.items() if getattr(args, flag, False)), "fp32"
    )


def optim_argument(optimizer: OptimizerSpec) -> str | None:
    """The `TrainingArguments.optim` that runs the optimizer a plan was measured with; None where
    the Trainer has no name for it. `apply_plan` leaves `optim` to the caller; the snippet names
    it."""
    if optimizer.name == "adamw":
        return "adamw_torch_fused" if optimizer.implementation == "fused" else "adamw_torch"
    if optimizer.name == "adafactor":
        return "adafactor"
    return None
