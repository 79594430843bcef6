"""Token budgets (`tuner.token_budget`) and the planner's eval and token-budget parts, pure:
probe results built from "true" memory models, every expectation computed here by brute force."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuner.errors import PlanError
from tuner.plan_probes import ExtraProbes, all_needs, extra_needs
from tuner.planner import make_plan, memory_budget
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, StepKind, parse_plan_request
from tuner.token_budget import lengths_to_probe, token_accumulation, token_budget

GIB = 1 << 30
DEVICE = DeviceSpec(name="Test GPU 24GB", total_memory_bytes=24 * GIB)
FIXED = 3 * GIB


def per_sample(length: int) -> float:
    """Bytes per row of `length` tokens: linear terms and attention's quadratic one."""
    return 600e3 * length + 400.0 * length**2


def workload(seq_len: int = 512, min_seq_len: int | None = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {"kind": "tokens", "seq_len": seq_len}
    if min_seq_len is not None:
        inputs["min_seq_len"] = min_seq_len
    return {
        "model": {"family": "builtin", "name": "decoder", "kwargs": {"max_seq_len": 512}},
        "inputs": inputs,
    }


def request(min_seq_len: int | None = 64, **extra: Any) -> Any:
    return parse_plan_request(
        {
            "workload": workload(min_seq_len=min_seq_len),
            "effective_batch_size": 64,
            "backend": "estimate",
            "device": DEVICE.model_dump(),
            "policy": {"gradient_checkpointing": "off", **extra.pop("policy", {})},
            **extra,
        }
    )


def true_max(line: MemoryLine) -> int:
    budget = memory_budget(DEVICE.total_memory_bytes, 0.05)
    return max((b for b in range(1, 5000) if line.at(b) <= budget), default=0)


def probe_at(length: int, *, step: StepKind = "train", probe_id: int | None = None) -> ProbeResult:
    cost = per_sample(length) / (6 if step == "eval" else 1)
    line = MemoryLine(fixed_bytes=FIXED, per_sample_bytes=cost)
    largest = true_max(line)
    spec = parse_plan_request({**request().model_dump(mode="json")}).workload.at_length(length)
    return ProbeResult(
        id=probe_id,
        fingerprint=spec.fingerprint(),
        workload=spec,
        device=DEVICE,
        backend="estimate",
        gradient_checkpointing=False,
        max_batch_size=largest,
        trials=[
            Trial(batch_size=largest, ok=True, peak_reserved_bytes=int(line.at(largest))),
            Trial(batch_size=largest + 1, ok=False),
        ],
        memory_line=line,
        step=step,
    )


def test_lengths_are_the_ends_and_the_middle() -> None:
    assert lengths_to_probe(64, 512) == [64, 288, 512]
    assert lengths_to_probe(100, 300) == [100, 200, 300]
    assert lengths_to_probe(1, 3) == [1, 2, 3]
    assert lengths_to_probe(512, 512) == [512]
    with pytest.raises(PlanError, match="min_seq_len"):
        lengths_to_probe(600, 512)


@given(
    st.integers(min_value=1, max_value=400),
    st.integers(min_value=0, max_value=400),
    st.floats(min_value=0.0, max_value=2000.0),
    st.floats(min_value=1e3, max_value=1e6),
)
def test_the_budget_from_the_probed_lengths_fits_every_length_in_between(
    low: int, span: int, quadratic: float, linear: float
) -> None:
    """For convex per-row memory, the minimum of `b(L) × L` over the probed lengths is a budget
    under which `budget // L` rows fit at every length of the range, probed or not."""
    high = low + span
    capacity = 20e9

    def largest(length: int) -> int:
        return math.floor(capacity / (linear * length + quadratic * length**2))

    found = token_budget({length: largest(length) for length in lengths_to_probe(low, high)})
    assert all(found.max_tokens // length <= largest(length) for length in range(low, high + 1))


def test_a_length_that_fits_nothing_is_refused() -> None:
    with pytest.raises(PlanError, match="512 tokens"):
        token_budget({64: 10, 512: 0})


def test_the_plan_gives_the_budget_set_by_the_longest_rows() -> None:
    asked = request(min_seq_len=64)
    extras = ExtraProbes(lengths={n: {False: probe_at(n)} for n in (64, 288)})
    plan = make_plan(asked, {False: probe_at(512)}, extras)
    by_length = {
        n: true_max(MemoryLine(fixed_bytes=FIXED, per_sample_bytes=per_sample(n))) for n in (64, 288, 512)
    }
    assert plan.max_tokens_per_micro_batch == min(b * n for n, b in by_length.items()) == by_length[512] * 512
    assert plan.token_budget is not None and plan.token_budget.limiting_seq_len == 512
    assert [p.max_batch_size for p in plan.token_budget.lengths] == [by_length[n] for n in (64, 288, 512)]
    assert plan.micro_batch_size <= by_length[512]  # the micro-batch at seq_len, as without a range
    assert plan.eval_micro_batch_size is None


def test_a_missing_length_probe_is_named() -> None:
    with pytest.raises(PlanError, match="length 64"):
        make_plan(
            request(min_seq_len=64),
            {False: probe_at(512)},
            ExtraProbes(lengths={288: {False: probe_at(288)}}),
        )


def test_effective_tokens_are_reached_with_balanced_micro_batches() -> None:
    asked = request(min_seq_len=64, effective_tokens=100_000)
    extras = ExtraProbes(lengths={n: {False: probe_at(n)} for n in (64, 288)})
    plan = make_plan(asked, {False: probe_at(512)}, extras)
    budget = plan.token_budget
    assert budget is not None and budget.effective_tokens == 100_000
    assert budget.accumulation_steps == math.ceil(100_000 / budget.max_tokens_per_micro_batch)
    assert budget.tokens_per_micro_batch is not None
    assert budget.tokens_per_micro_batch <= budget.max_tokens_per_micro_batch
    assert budget.tokens_per_micro_batch * budget.accumulation_steps >= 100_000
    assert any("GradientAccumulator.backward(loss_sum, num_items)" in hint for hint in plan.hints)


def test_token_accumulation_refuses_what_no_loop_reaches() -> None:
    with pytest.raises(PlanError, match=r"effective_tokens \(1000\) is not reachable"):
        token_accumulation(1000, 1, max_tokens=8192, seq_len=1024)
    with pytest.raises(PlanError, match="not divisible by the world size"):
        token_accumulation(4097, 4, max_tokens=8192, seq_len=512)
    assert token_accumulation(8192, 2, max_tokens=4096, seq_len=512).accumulation_steps == 1


def test_the_eval_micro_batch_comes_from_the_eval_probe() -> None:
    asked = request(min_seq_len=None, policy={"eval": True})
    train, evaluation = probe_at(512), probe_at(512, step="eval", probe_id=7)
    plan = make_plan(asked, {False: train}, ExtraProbes(eval=evaluation))
    assert plan.eval_micro_batch_size == evaluation.max_batch_size > train.max_batch_size
    assert plan.eval_probe_id == 7
    assert plan.eval_predicted_peak_bytes is not None
    assert plan.eval_predicted_peak_bytes <= plan.memory_budget_bytes
    with pytest.raises(PlanError, match=r"policy\.eval needs an eval probe"):
        make_plan(asked, {False: train})
    with pytest.raises(PlanError, match="ran the train step"):
        make_plan(asked, {False: train}, ExtraProbes(eval=probe_at(512)))


def test_the_needs_name_each_probe_once() -> None:
    asked = parse_plan_request(
        {
            "workload": workload(min_seq_len=64),
            "effective_batch_size": 64,
            "policy": {"gradient_checkpointing": "auto", "eval": True},
        }
    )
    needs = all_needs(asked)
    assert [need.describe() for need in needs] == [
        "checkpointing off",
        "checkpointing on",
        "eval",
        "length 64, checkpointing off",
        "length 64, checkpointing on",
        "length 288, checkpointing off",
        "length 288, checkpointing on",
    ]
    # The train probe is the workload at seq_len: min_seq_len is no part of what it runs.
    assert needs[0].workload.fingerprint() == asked.workload.fingerprint()
    assert needs[0].workload.inputs.model_dump()["min_seq_len"] is None
    assert extra_needs(request(min_seq_len=None)) == []


def bent_near_the_limit(probe: ProbeResult) -> ProbeResult:
    """`probe` with a line fitted far below that runs under its measured peaks near the limit:
    555 passes 40 MiB within the budget, 558 passes 70 MiB over it, 559 fails."""
    budget = memory_budget(DEVICE.total_memory_bytes, 0.05)
    low, high = 555, 558
    return probe.model_copy(
        update={
            "max_batch_size": high,
            "memory_line": MemoryLine(fixed_bytes=GIB, per_sample_bytes=(budget - 3 * GIB) / high),
            "trials": [
                Trial(batch_size=low, ok=True, peak_reserved_bytes=budget - 40 * (1 << 20)),
                Trial(batch_size=high, ok=True, peak_reserved_bytes=budget + 70 * (1 << 20)),
                Trial(batch_size=high + 1, ok=False),
            ],
        }
    )


def test_measured_trials_around_the_answer_overrule_a_line_fitted_far_below() -> None:
    """A line fitted at small batches that runs under the measured peaks near the limit: the
    eval micro-batch stays where the straight line between the bracketing trials allows."""
    asked = request(min_seq_len=None, policy={"eval": True})
    budget = memory_budget(DEVICE.total_memory_bytes, 0.05)
    evaluation = bent_near_the_limit(probe_at(512, step="eval"))
    plan = make_plan(asked, {False: probe_at(512)}, ExtraProbes(eval=evaluation))
    # 40 MiB of room at 555 and 110 MiB per 3 samples: one more sample, not two.
    assert plan.eval_micro_batch_size == 556
    assert plan.eval_predicted_peak_bytes is not None
    assert budget - 40 * (1 << 20) < plan.eval_predicted_peak_bytes <= budget


def test_the_training_micro_batch_keeps_to_the_measured_trials_around_it_too() -> None:
    """The same line fitted far below, on the train probe: the training micro-batch is not the 557
    that line allows below the over-budget trial at 558, but the 556 the straight line between
    the bracketing trials allows (an uneven split reaches the prime per-rank batch)."""
    budget = memory_budget(DEVICE.total_memory_bytes, 0.05)
    train = bent_near_the_limit(probe_at(512))
    asked = request(min_seq_len=None, effective_batch_size=557, policy={"allow_uneven_micro_batches": True})
    plan = make_plan(asked, {False: train})
    assert max(plan.micro_batch_sizes or [plan.micro_batch_size]) <= 556
    assert sum(plan.micro_batch_sizes or [plan.micro_batch_size * plan.accumulation_steps]) == 557
    assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= budget
    even = make_plan(request(min_seq_len=None, effective_batch_size=556), {False: train})
    assert (even.micro_batch_size, even.accumulation_steps) == (556, 1)
    assert even.predicted_peak_bytes is not None
    assert budget - 40 * (1 << 20) < even.predicted_peak_bytes <= budget


def test_the_length_range_is_no_part_of_the_fingerprint() -> None:
    ranged = request(min_seq_len=64).workload
    fixed = request(min_seq_len=None).workload
    assert ranged.fingerprint() == fixed.fingerprint()
    assert ranged.at_length(64).fingerprint() != fixed.fingerprint()
    assert ranged.at_length(64).inputs.model_dump()["seq_len"] == 64
    assert ranged.at_length(64).inputs.model_dump()["min_seq_len"] is None
