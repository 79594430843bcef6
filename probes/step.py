"""The canonical train step (docs/workloads.md): the one loop that every backend runs, so that an
estimate, a GPU probe and a user's loop measure the same thing.

Per iteration: batch → forward and loss under the precision's autocast → backward (GradScaler
for fp16-mixed) → optimizer step → `zero_grad(set_to_none=True)`. The forward's output (the
logits) lives through backward and the optimizer step where the spec's `loop.keeps_outputs` says
so (MiniMind's, nanoGPT's loops), and dies before backward otherwise (HF Trainer's). Nothing but
the loss's value survives an iteration. At least two iterations count, because optimizers create
their state at the first `step()` and the second iteration is the first that holds all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from probes.workloads import BuiltWorkload

Phase = Literal["forward", "backward", "optimizer"]

FP16_LOSS_SCALE = 2.0**16
"""The constant the loss is scaled by in fp16 without data-dependent checks (GradScaler's
initial scale), so that the backward pass is the same work as with a GradScaler."""


@dataclass
class StepReport:
    """What the iterations returned."""

    losses: list[float | None] = field(default_factory=list)
    """Loss per iteration; None where `data_dependent=False` (fake tensors have no values)."""
    seconds: list[float] = field(default_factory=list)
    """Wall-clock seconds per iteration (exact on a GPU only when `synchronize` is given)."""


def run_train_steps(
    workload: BuiltWorkload,
    batch_size: int,
    *,
    iterations: int = 2,
    optimizer: torch.optim.Optimizer | None = None,
    on_phase: Callable[[Phase, int], None] | None = None,
    synchronize: Callable[[], None] | None = None,
    data_dependent: bool = True,
) -> StepReport:
    """Run `iterations` full train steps of `batch_size` samples.

    `on_phase(phase, iteration)` is called at the start of each phase (e.g. to attribute peak
    memory to a phase); `synchronize` (e.g. `torch.cuda.synchronize`) is called around each
    iteration so that its time is real. `data_dependent=False` is for fake tensors: no
    `loss.item()`, and in fp16 a constant loss scale instead of GradScaler's inf/NaN checks.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if optimizer is None:
        optimizer = workload.make_optimizer()
    fp16 = workload.spec.precision == "fp16-mixed"
    keeps_outputs = workload.spec.loop.keeps_outputs
    scaler = torch.amp.GradScaler(workload.device.type) if fp16 and data_dependent else None
    report = StepReport()

    def phase(name: Phase, iteration: int) -> None:
        if on_phase is not None:
            on_phase(name, iteration)

    for iteration in range(iterations):
        if synchronize is not None:
            synchronize()
        started = time.perf_counter()

        phase("forward", iteration)
        # The batch lives through the whole iteration, as a loop variable does in every real loop.
        batch = workload.make_batch(batch_size)
        with workload.autocast():
            loss, output = workload.forward(batch)
        if not keeps_outputs:
            # HF Trainer's `compute_loss` shape: only the loss reaches backward, the logits die here.
            output = None

        phase("backward", iteration)
        if scaler is not None:
            scaler.scale(loss).backward()
        elif fp16:
            (loss * FP16_LOSS_SCALE).backward()
        else:
            loss.backward()

        phase("optimizer", iteration)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # MiniMind's and nanoGPT's shape: the output (with its logits) is released only here.
        del output, batch

        report.losses.append(float(loss.detach().item()) if data_dependent else None)
        del loss
        if synchronize is not None:
            synchronize()
        report.seconds.append(time.perf_counter() - started)
    return report
