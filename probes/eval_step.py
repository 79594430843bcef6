"""The eval step: what an evaluation loop run during training holds, the counterpart of the
canonical train step (`probes.step`) that both backends run for a probe of step kind `eval`.

An eval loop runs while the training state is still resident: the parameters and the optimizer's
state (allocated as after a real step), the gradients freed (`zero_grad(set_to_none=True)`). It
runs the forward only, with the model in eval mode (dropout off, BatchNorm on running
statistics) under `torch.no_grad()`, so no activation is saved for a backward: memory per sample
is the forward's transient working set plus the output (the logits), which the loop keeps until
the eval loss is computed from it.

The forward gets the inputs alone, as a prediction loop does; the eval loss is computed from the
logits (the fp32 upcast of the logits that transformers' own loss makes is made here too). A model
whose forward cannot run without labels is refused, naming `policy.eval`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from probes.step import Phase, StepReport, run_train_steps
from probes.workloads import INPUT_KEYS, Batch, BuiltWorkload, loss_from_output
from tuner.errors import ModelBuildError

TRAINING_STATE_BATCH_SIZE = 2
"""The train step that creates the optimizer's state before an eval probe: the smallest batch a
BatchNorm layer trains on (its batch statistics need two samples); its activations are freed
before the eval step runs, what stays is what any training step leaves."""


def prepare_training_state(
    workload: BuiltWorkload, optimizer: torch.optim.Optimizer, *, data_dependent: bool = True
) -> None:
    """Run one real train step so that the optimizer's state exists as it does in training (Adam's
    two moments per parameter, SGD's momentum); the gradients are freed by the step's
    `zero_grad(set_to_none=True)`."""
    run_train_steps(
        workload,
        TRAINING_STATE_BATCH_SIZE,
        iterations=1,
        optimizer=optimizer,
        data_dependent=data_dependent,
    )


def eval_forward(workload: BuiltWorkload, batch: Batch) -> tuple[torch.Tensor, Any]:
    """The eval loss and the model's output for one batch, the forward given the inputs alone."""
    labels = batch["labels"]
    inputs = batch[INPUT_KEYS[workload.spec.inputs.kind]]
    model = workload.model
    if needs_labels(model):
        raise ModelBuildError(
            "policy.eval: the model's forward needs labels (a required 'labels' argument), so it cannot "
            "run as an eval forward on the inputs alone; plan without policy.eval, or give its forward "
            "'labels=None' and return logits when none are given."
        )
    out = model(input_ids=inputs) if workload.spec.model.family == "transformers" else model(inputs)
    try:
        loss = loss_from_output(out, labels)
    except ModelBuildError as exc:
        raise ModelBuildError(
            f"policy.eval: the model's eval-mode forward without labels returned no logits to score "
            f"({exc.message})"
        ) from None
    return loss, out


def needs_labels(model: torch.nn.Module) -> bool:
    """Whether the model's forward has a `labels` parameter without a default."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    labels = parameters.get("labels")
    return labels is not None and labels.default is inspect.Parameter.empty


def run_eval_steps(
    workload: BuiltWorkload,
    batch_size: int,
    *,
    iterations: int = 2,
    on_phase: Callable[[Phase, int], None] | None = None,
    synchronize: Callable[[], None] | None = None,
    data_dependent: bool = True,
) -> StepReport:
    """Run `iterations` eval forwards of `batch_size` samples (the training state must already be
    resident: `prepare_training_state`). The model is in eval mode for the steps and back in its
    previous mode after them."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    model = workload.model
    was_training = model.training
    report = StepReport()
    model.eval()
    try:
        for iteration in range(iterations):
            if synchronize is not None:
                synchronize()
            started = time.perf_counter()
            if on_phase is not None:
                on_phase("forward", iteration)
            with torch.no_grad():
                batch = workload.make_batch(batch_size)
                with workload.autocast():
                    loss, output = eval_forward(workload, batch)
                # The loop keeps the output (for metrics) until the loss is read: both live here.
                report.losses.append(float(loss.item()) if data_dependent else None)
                del output, batch, loss
            if synchronize is not None:
                synchronize()
            report.seconds.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    return report
