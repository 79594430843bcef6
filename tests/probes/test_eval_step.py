"""The eval step (`probes.eval_step`): forward only under `torch.no_grad()` in eval mode with the
training state resident, on real CPU tensors and in the estimate's trace."""

from __future__ import annotations

import math

import pytest
import torch

from probes.estimate.remote import estimate_peak
from probes.eval_step import prepare_training_state, run_eval_steps
from probes.probe import run_probe
from probes.workloads import build_workload
from tests.probes.tiny_specs import SMALL_LLAMA
from tuner.errors import ModelBuildError, TunerError
from tuner.spec import DeviceSpec, parse_workload

LLAMA = SMALL_LLAMA
CARD = DeviceSpec(name="Test GPU 2GiB", total_memory_bytes=2 << 30)


def test_training_state_is_resident_and_gradients_freed() -> None:
    workload = build_workload(parse_workload(LLAMA))
    optimizer = workload.make_optimizer()
    prepare_training_state(workload, optimizer)
    parameters = [p for p in workload.model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in parameters)
    # AdamW: two moments per parameter, allocated as after a real step.
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in parameters)
    report = run_eval_steps(workload, 3)
    assert all(loss is not None and math.isfinite(loss) for loss in report.losses)
    assert workload.model.training  # back in training mode
    assert all(p.grad is None for p in parameters)  # no_grad: nothing accumulated


def test_eval_leaves_dropout_off_and_the_weights_alone() -> None:
    spec = parse_workload({**LLAMA, "precision": "fp32"})
    workload = build_workload(spec)
    optimizer = workload.make_optimizer()
    prepare_training_state(workload, optimizer)
    before = [p.detach().clone() for p in workload.model.parameters()]
    first = run_eval_steps(workload, 2, iterations=1)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(before, workload.model.parameters(), strict=True))
    assert first.losses[0] is not None


def test_estimated_eval_peak_counts_the_optimizer_state() -> None:
    spec = parse_workload(LLAMA)
    train = estimate_peak(spec, 8)
    evaluation = estimate_peak(spec, 8, step="eval")
    parameter_bytes = evaluation.categories["parameters"]
    optimizer_bytes = evaluation.categories["optimizer_state"]
    # AdamW keeps two fp32 moments per fp32 parameter: twice the parameters, in the eval peak.
    assert optimizer_bytes >= 2 * parameter_bytes * 0.99
    assert optimizer_bytes == train.categories["optimizer_state"]
    assert evaluation.categories["gradients"] == 0
    assert evaluation.peak_phase == "forward"
    assert evaluation.peak_allocated_bytes >= parameter_bytes + optimizer_bytes
    assert evaluation.peak_allocated_bytes < train.peak_allocated_bytes


def test_eval_micro_batch_exceeds_the_training_micro_batch() -> None:
    spec = parse_workload(LLAMA)
    train = run_probe(spec, backend="estimate", device=CARD, gradient_checkpointing=False)
    evaluation = run_probe(spec, backend="estimate", device=CARD, gradient_checkpointing=False, step="eval")
    assert evaluation.step == "eval" and train.step == "train"
    assert evaluation.max_batch_size > train.max_batch_size > 0
    # The answer is tight: one more sample does not fit.
    failing = [t for t in evaluation.trials if not t.ok]
    assert min(t.batch_size for t in failing) == evaluation.max_batch_size + 1


def test_eval_on_a_model_whose_forward_needs_labels_names_the_field() -> None:
    spec = parse_workload(
        {
            "model": {"family": "python", "factory": "tests.probes.factories:labelled_only"},
            "inputs": {"kind": "features", "dim": 16},
        }
    )
    workload = build_workload(spec)
    optimizer = workload.make_optimizer()
    prepare_training_state(workload, optimizer)  # training takes the labels: fine
    with pytest.raises(ModelBuildError, match=r"^policy\.eval: the model's forward needs labels"):
        run_eval_steps(workload, 2)
    with pytest.raises(TunerError, match=r"^policy\.eval") as raised:
        run_probe(spec, backend="estimate", device=CARD, gradient_checkpointing=False, step="eval")
    assert raised.value.code == ModelBuildError.code  # a 422 for whoever asked
