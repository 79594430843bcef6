"""Apply a plan to a PyTorch Lightning `Trainer` (`lightning` or `pytorch_lightning`).

Lightning takes the accumulation as `Trainer(accumulate_grad_batches=...)` and the micro-batch
as the DataLoader's batch size, which lives on the LightningModule or LightningDataModule (as a
`batch_size` attribute or hyperparameter, the convention its batch-size finder uses too). A plan's
eval micro-batch goes to the eval loader's batch size the same way (`eval_batch_size`).

Lightning's automatic optimisation divides each micro-batch's loss by `accumulate_grad_batches`:
the textbook loop, biased when micro-batches hold different numbers of loss tokens (docs/training.md,
"Why the textbook loop is not exact"). For token losses with padding, use manual optimisation with
`tuner.training.GradientAccumulator`, or return losses already normalised by the window's
token count.

Nothing here imports Lightning until a function needs it; `plan_callback` is the only one that
does.
"""

from __future__ import annotations

import importlib
from typing import Any

from tuner.errors import PlanError
from tuner.results import Plan

__all__ = ["apply_batch_size", "apply_eval_batch_size", "lightning_module", "plan_callback", "trainer_kwargs"]


def trainer_kwargs(plan: Plan) -> dict[str, Any]:
    """Keyword arguments for `Trainer(...)` that apply the plan: `accumulate_grad_batches`."""
    _refuse_uneven(plan)
    return {"accumulate_grad_batches": plan.accumulation_steps}


def apply_batch_size(target: Any, plan: Plan, *, attribute: str = "batch_size") -> None:
    """Set the micro-batch on a LightningModule or LightningDataModule: its `batch_size` attribute
    where it has one, else its `hparams` entry (how Lightning's batch-size finder finds it)."""
    _refuse_uneven(plan)
    if not _set_batch_size(target, attribute, plan.micro_batch_size):
        raise PlanError(
            f"{type(target).__name__} has no {attribute!r} attribute or hyperparameter to put the "
            f"micro-batch ({plan.micro_batch_size}) in."
        )


def apply_eval_batch_size(target: Any, plan: Plan, *, attribute: str = "eval_batch_size") -> None:
    """Set the plan's eval micro-batch (planned with `policy.eval`) as the batch size the eval
    loader reads from a LightningModule or LightningDataModule: its `eval_batch_size` attribute or
    hyperparameter."""
    if plan.eval_micro_batch_size is None:
        raise PlanError("The plan has no eval micro-batch: ask for one with policy.eval (tuner plan --eval).")
    if not _set_batch_size(target, attribute, plan.eval_micro_batch_size):
        raise PlanError(
            f"{type(target).__name__} has no {attribute!r} attribute or hyperparameter to put the "
            f"eval micro-batch ({plan.eval_micro_batch_size}) in."
        )


def _has_batch_size(target: Any, attribute: str) -> bool:
    return target is not None and (
        hasattr(target, attribute) or attribute in (getattr(target, "hparams", None) or {})
    )


def _set_batch_size(target: Any, attribute: str, value: int) -> bool:
    hparams = getattr(target, "hparams", None)
    if hasattr(target, attribute):
        setattr(target, attribute, value)
    elif hparams is not None and attribute in hparams:
        hparams[attribute] = value
    else:
        return False
    return True


def lightning_module() -> Any:
    """`lightning.pytorch`, else `pytorch_lightning`; a clear error when neither is installed."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise PlanError("Neither lightning nor pytorch_lightning is installed: pip install lightning.")


def plan_callback(plan: Plan) -> Any:
    """A Lightning `Callback` that applies the plan when fitting starts: the Trainer's
    `accumulate_grad_batches`, and the micro-batch on the datamodule (or the module); a plan's eval
    micro-batch too, where the datamodule (or the module) has an `eval_batch_size`."""
    pl = lightning_module()
    _refuse_uneven(plan)

    class ApplyPlan(pl.Callback):  # type: ignore[misc,name-defined]
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if stage != "fit":
                return
            trainer.accumulate_grad_batches = plan.accumulation_steps
            datamodule = getattr(trainer, "datamodule", None)
            apply_batch_size(datamodule if _has_batch_size(datamodule, "batch_size") else pl_module, plan)
            if plan.eval_micro_batch_size is not None:
                for target in (datamodule, pl_module):
                    if _has_batch_size(target, "eval_batch_size"):
                        apply_eval_batch_size(target, plan)
                        break

    return ApplyPlan()


def _refuse_uneven(plan: Plan) -> None:
    if plan.micro_batch_sizes:
        raise PlanError(
            f"The plan uses uneven micro-batches {plan.micro_batch_sizes}, which Lightning cannot "
            "express: ask for a plan with allow_uneven_micro_batches off."
        )
