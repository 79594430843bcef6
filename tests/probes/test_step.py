"""The canonical train step on every family and precision the CPU supports."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from probes.step import Phase, run_train_steps
from probes.workloads import build_workload, next_token_loss
from tests.probes.tiny_specs import MODELS, PRECISIONS, tiny_spec
from tuner.spec import parse_workload


def cpu_supports(precision: str) -> bool:
    if precision != "fp16-mixed":
        return True
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("label", sorted(MODELS))
def test_two_steps_train_every_family_in_every_precision(label: str, precision: str) -> None:
    if not cpu_supports(precision):
        pytest.skip(f"this CPU build has no {precision} autocast")
    workload = build_workload(tiny_spec(label, precision=precision))
    before = {name: p.detach().clone() for name, p in workload.model.named_parameters()}
    optimizer = workload.make_optimizer()

    report = run_train_steps(workload, 4, optimizer=optimizer)

    assert len(report.losses) == len(report.seconds) == 2
    assert all(loss is not None and math.isfinite(loss) for loss in report.losses), report.losses
    assert all(seconds > 0 for seconds in report.seconds)
    changed = [name for name, p in workload.model.named_parameters() if not torch.equal(p, before[name])]
    # bf16 weights near 1 (norm scales) move less than a bf16 step; everything else must move.
    minimum = 0.5 if precision == "bf16" else 1.0
    assert len(changed) >= minimum * len(before), sorted(set(before) - set(changed))
    trainable = [p for p in workload.model.parameters() if p.requires_grad]
    assert all(p in optimizer.state and optimizer.state[p] for p in trainable)
    assert all(p.grad is None for p in trainable)  # zero_grad(set_to_none=True): nothing survives


def test_the_moe_aux_loss_is_part_of_the_loss() -> None:
    workload = build_workload(tiny_spec("decoder-moe"))
    batch = workload.make_batch(2)
    loss = workload.loss(batch)
    out = workload.model(batch["input_ids"])
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(loss, next_token_loss(out.logits, batch["labels"]) + out.aux_loss)


def test_a_model_that_scores_itself_gives_the_loss() -> None:
    model, inputs = MODELS["python"]
    spec = parse_workload(
        {"model": {**model, "factory": "tests.probes.factories:self_scoring"}, "inputs": inputs}
    )
    workload = build_workload(spec)
    loss = float(workload.loss(workload.make_batch(8)).detach())
    assert loss > 10  # the model's own loss: cross-entropy plus 10


def test_token_logits_from_a_python_model_get_the_next_token_loss() -> None:
    spec = parse_workload(
        {
            "model": {"family": "python", "factory": "tests.probes.factories:token_model"},
            "inputs": {"kind": "tokens", "seq_len": 8},
        }
    )
    workload = build_workload(spec)
    batch = workload.make_batch(3)
    expected = next_token_loss(workload.model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(workload.loss(batch), expected)
    assert abs(float(expected.detach()) - math.log(64)) < 0.5  # near-uniform over the 64 tokens at init


def test_the_phases_are_reported_in_order_and_timing_synchronizes() -> None:
    workload = build_workload(tiny_spec("mlp"))
    phases: list[tuple[Phase, int]] = []
    syncs: list[int] = []
    run_train_steps(
        workload,
        2,
        iterations=3,
        on_phase=lambda p, i: phases.append((p, i)),
        synchronize=lambda: syncs.append(1),
    )
    assert phases == [(p, i) for i in range(3) for p in ("forward", "backward", "optimizer")]
    assert len(syncs) == 6


def test_at_least_one_iteration() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_train_steps(build_workload(tiny_spec("mlp")), 2, iterations=0)


FAKE_CASES = [
    (label, "fp16-mixed") for label in ("mlp", "cnn", "decoder", "decoder-moe", "gpt2", "llama", "python")
]


@pytest.mark.parametrize(
    ("label", "precision"), [*FAKE_CASES, ("decoder-moe", "fp32"), ("decoder-moe", "bf16")]
)
def test_the_step_runs_on_fake_tensors_without_reading_values(label: str, precision: str) -> None:
    with FakeTensorMode():
        workload = build_workload(
            tiny_spec(label, precision=precision), gradient_checkpointing=label == "decoder"
        )
        report = run_train_steps(workload, 64, data_dependent=False)
    assert report.losses == [None, None]


def test_fp16_without_data_dependent_checks_still_trains() -> None:
    # The constant loss scale stands in for GradScaler; on real tensors the weights still move.
    workload = build_workload(tiny_spec("mlp", precision="fp16-mixed"))
    before = [p.detach().clone() for p in workload.model.parameters()]
    run_train_steps(workload, 4, data_dependent=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, workload.model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "implementation"),
    [(n, i) for n in ("adamw", "adam", "sgd") for i in ("foreach", "fused", "for-loop")]
    + [("adafactor", "foreach"), ("adafactor", "for-loop")],
)
def test_every_optimizer_implementation_creates_its_state(name: str, implementation: str) -> None:
    if name == "adafactor" and not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor is missing")
    workload = build_workload(
        tiny_spec("decoder", optimizer={"name": name, "implementation": implementation})
    )
    optimizer = workload.make_optimizer()
    report = run_train_steps(workload, 2, optimizer=optimizer)
    assert all(loss is not None and math.isfinite(loss) for loss in report.losses)
    assert len(optimizer.state) == len(list(workload.model.parameters()))
