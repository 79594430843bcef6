"""The planner (docs/planner.md): properties over random requests and probes, and table tests.

Probe results are built directly from a "true" memory line (what a probe would have measured),
and every expectation is computed here independently of the planner's own helpers: brute-force
searches over micro-batch sizes and divisors, and `numpy.interp` for throughput.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from tuner.errors import NothingFitsError, PlanError
from tuner.planner import make_plan, ramp_schedule
from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanRequest, RampSpec, parse_plan_request

GIB = 1 << 30
DEVICE = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=80 * GIB)
WORKLOAD = {"model": {"family": "builtin", "name": "cnn"}, "inputs": {"kind": "image"}}

# Each warning's distinctive words (the planner's sentences start with or contain them).
BATCHNORM = "BatchNorm with a micro-batch"
MANY_STEPS = "(more than 64)"
FEW_STEPS = "Accumulation of only"
NOT_REACHABLE = "is not reachable exactly"


def request(effective: int, world: int = 1, **policy: Any) -> PlanRequest:
    return parse_plan_request(
        {
            "workload": WORKLOAD,
            "effective_batch_size": effective,
            "world_size": world,
            "backend": "cuda",
            "policy": policy,
        }
    )


def probe(
    checkpointing: bool,
    max_batch_size: int,
    *,
    line: MemoryLine | None = None,
    speeds: dict[int, float] | None = None,
    batchnorm: bool = False,
    with_line: bool = True,
    device: DeviceSpec = DEVICE,
    probe_id: int | None = None,
) -> ProbeResult:
    """A probe result as a search would store it: passing trials up to the maximum (reserved
    peaks on `line`, samples/s from `speeds`) and one failing trial above it."""
    line = line or MemoryLine(fixed_bytes=4 * GIB, per_sample_bytes=GIB)
    sizes = sorted({*(speeds or {}), max(1, max_batch_size // 2), max_batch_size} - {0})
    trials = [
        Trial(
            batch_size=b,
            ok=True,
            peak_allocated_bytes=int(line.at(b) * 0.9),
            peak_reserved_bytes=int(line.at(b)),
            samples_per_second=(speeds or {}).get(b),
        )
        for b in sizes
        if b <= max_batch_size
    ]
    trials.append(Trial(batch_size=max_batch_size + 1, ok=False, error="out_of_memory"))
    workload = request(1).workload
    return ProbeResult(
        id=probe_id,
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=device,
        backend="cuda",
        gradient_checkpointing=checkpointing,
        max_batch_size=max_batch_size,
        trials=trials,
        memory_line=line if with_line else None,
        facts=WorkloadFacts(parameter_count=1000, has_batchnorm=batchnorm),
        versions={"torch": "2.13.0", "tuner": "0.1.0"},
    )


def has(plan: Plan, words: str) -> bool:
    return any(words in warning for warning in plan.warnings)


def brute_usable(result: ProbeResult, budget: int, cap: int | None) -> int:
    """Largest b ≤ the probe's maximum and the cap whose predicted reserved peak fits the budget."""
    limit = min(result.max_batch_size, cap or result.max_batch_size)
    line = result.memory_line
    if line is not None:
        return max((b for b in range(1, limit + 1) if line.at(b) <= budget), default=0)
    # Without a line only measured sizes are trusted once one of them exceeded the budget.
    measured = {t.batch_size: t.peak_reserved_bytes or 0 for t in result.trials if t.ok}
    if all(peak <= budget for peak in measured.values()):
        return limit
    return min(limit, max((b for b, peak in measured.items() if peak <= budget), default=0))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --- properties ---------------------------------------------------------------------------------


@st.composite
def planning_cases(draw: st.DrawFn) -> dict[str, Any]:
    world = draw(st.sampled_from([1, 1, 2, 3, 4, 8]))
    per_rank = draw(st.one_of(st.integers(1, 64), st.integers(1, 3000)))
    per_sample = draw(st.integers(16 << 20, 2 * GIB))
    fixed = draw(st.integers(0, 40 * GIB))
    line = MemoryLine(fixed_bytes=fixed, per_sample_bytes=per_sample)
    true_max = min(line.largest_batch_under(DEVICE.total_memory_bytes), 700)
    # A probe may stop below the true maximum, or find nothing at all.
    max_batch = draw(st.one_of(st.just(true_max), st.integers(0, true_max)))
    return {
        "world": world,
        "per_rank": per_rank,
        "line": line,
        "max_batch": max_batch,
        "with_line": draw(st.booleans()),
        "margin": draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])),
        "cap": draw(st.one_of(st.none(), st.integers(1, 400))),
        "uneven": draw(st.booleans()),
        "batchnorm": draw(st.booleans()),
    }


@settings(max_examples=400, deadline=None)
@given(planning_cases())
def test_plan_properties(case: dict[str, Any]) -> None:
    effective = case["per_rank"] * case["world"]
    req = request(
        effective,
        case["world"],
        gradient_checkpointing="off",
        memory_margin=case["margin"],
        max_micro_batch_size=case["cap"],
        allow_uneven_micro_batches=case["uneven"],
    )
    result = probe(
        False, case["max_batch"], line=case["line"], batchnorm=case["batchnorm"], with_line=case["with_line"]
    )
    budget = int(DEVICE.total_memory_bytes * (1 - case["margin"]))
    usable = brute_usable(result, budget, case["cap"])
    event("nothing fits" if usable == 0 else "fits")
    if usable == 0:
        with pytest.raises(NothingFitsError, match="Nothing fits"):
            make_plan(req, {False: result})
        return
    plan = make_plan(req, {False: result})
    per_rank = case["per_rank"]
    sizes = plan.micro_batch_sizes or [plan.micro_batch_size] * plan.accumulation_steps

    # The product invariant: exact, even or uneven.
    assert sum(sizes) * case["world"] == effective
    assert len(sizes) == plan.accumulation_steps
    if plan.micro_batch_sizes is None:
        assert plan.micro_batch_size * plan.accumulation_steps * case["world"] == effective
    # Never above what fit, the cap, or the budget.
    assert max(sizes) == plan.micro_batch_size <= usable <= case["max_batch"]
    assert plan.memory_budget_bytes == budget
    if case["with_line"]:
        assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= budget
    # Minimal accumulation: no even split with fewer steps fits.
    best = max(d for d in divisors(per_rank) if d <= usable)
    poor = best < 0.8 * min(usable, per_rank)
    fewest_uneven = math.ceil(per_rank / usable)
    event(f"poor split: {poor}, uneven: {plan.micro_batch_sizes is not None}")
    steps = plan.accumulation_steps
    event(f"accumulation: {'1' if steps == 1 else '2-3' if steps < 4 else '4-64' if steps <= 64 else '>64'}")
    if case["uneven"] and poor and fewest_uneven < per_rank // best:
        assert plan.micro_batch_sizes is not None
        assert plan.accumulation_steps == fewest_uneven
        assert max(sizes) - min(sizes) == 1
    else:
        assert plan.micro_batch_sizes is None
        assert plan.micro_batch_size == best
    # Every warning exactly when its condition holds.
    assert has(plan, BATCHNORM) == (case["batchnorm"] and min(sizes) < 8)
    assert has(plan, MANY_STEPS) == (plan.accumulation_steps > 64)
    assert has(plan, FEW_STEPS) == (plan.accumulation_steps in (2, 3))
    assert has(plan, NOT_REACHABLE) == (poor and plan.micro_batch_sizes is None)
    # 2 or 3 steps only when memory forces them.
    if plan.accumulation_steps in (2, 3):
        assert per_rank > usable
    # No scaling rule without the batch the learning rate was tuned at, which no request names.
    assert not any("learning rate" in hint.lower() for hint in plan.hints if plan.policy.ramp is None)
    uneven_hint = any("GradientAccumulator.backward" in hint for hint in plan.hints)
    assert uneven_hint == (plan.micro_batch_sizes is not None)


@st.composite
def throughput_cases(draw: st.DrawFn) -> dict[str, Any]:
    per_rank = draw(st.integers(1, 1024))
    max_batch = draw(st.integers(1, 256))
    sizes = draw(st.lists(st.integers(1, max_batch), min_size=1, max_size=5, unique=True))
    speeds = {b: draw(st.floats(10.0, 1000.0)) for b in sizes}
    return {"per_rank": per_rank, "max_batch": max_batch, "speeds": speeds}


@settings(max_examples=300, deadline=None)
@given(throughput_cases())
def test_micro_batch_maximises_predicted_throughput(case: dict[str, Any]) -> None:
    """With measured samples/s: the fewest steps among the sizes within 2 % of the best predicted
    throughput (linear between measured sizes, flat beyond), never 2–3 steps unless forced."""
    per_rank, max_batch, speeds = case["per_rank"], case["max_batch"], case["speeds"]
    line = MemoryLine(fixed_bytes=GIB, per_sample_bytes=(70 * GIB) / max_batch)
    result = probe(False, max_batch, line=line, speeds=speeds)
    plan = make_plan(request(per_rank, gradient_checkpointing="off", memory_margin=0.0), {False: result})
    xs = sorted(speeds)

    def predicted(b: int) -> float:
        return float(np.interp(b, xs, [speeds[x] for x in xs]))

    fitting = [d for d in divisors(per_rank) if d <= max_batch]
    fewest = per_rank // max(fitting)
    allowed = [d for d in fitting if per_rank // d == fewest or per_rank // d not in (2, 3)]
    best = max(predicted(d) for d in allowed)
    expected = max(d for d in allowed if predicted(d) >= best * 0.98)
    assert plan.micro_batch_size == expected
    assert plan.predicted_samples_per_second == pytest.approx(predicted(expected))


# --- checkpointing choice -----------------------------------------------------------------------

# (off max, off speeds, on max, on speeds, effective batch, expected checkpointing)
CHECKPOINTING_TABLE = [
    # The larger checkpointed batch wins: small batches starve the GPU without checkpointing.
    pytest.param(8, {4: 200.0, 8: 300.0}, 64, {32: 450.0, 64: 520.0}, 512, True, id="checkpointed-wins"),
    # It loses: both run near saturation and recomputation costs ~20 %.
    pytest.param(64, {32: 900.0, 64: 1000.0}, 160, {80: 780.0, 160: 800.0}, 640, False, id="recompute-loses"),
    # Within the 2 % tolerance: a tie goes to checkpointing off.
    pytest.param(32, {32: 1000.0}, 128, {128: 1015.0}, 512, False, id="tie-prefers-off"),
    # Just beyond the tolerance: checkpointing on.
    pytest.param(32, {32: 1000.0}, 128, {128: 1030.0}, 512, True, id="three-percent-wins"),
    # Off's best divisor of 96 is 48, on reaches 96 in one step, but 48 without is faster.
    pytest.param(50, {25: 700.0, 50: 760.0}, 200, {100: 600.0, 200: 640.0}, 96, False, id="one-step-loses"),
]


@pytest.mark.parametrize(
    ("off_max", "off_speeds", "on_max", "on_speeds", "effective", "expect_on"), CHECKPOINTING_TABLE
)
def test_checkpointing_by_predicted_throughput(
    off_max: int,
    off_speeds: dict[int, float],
    on_max: int,
    on_speeds: dict[int, float],
    effective: int,
    expect_on: bool,
) -> None:
    off_line = MemoryLine(fixed_bytes=GIB, per_sample_bytes=70 * GIB / off_max)
    on_line = MemoryLine(fixed_bytes=GIB, per_sample_bytes=70 * GIB / on_max)
    probes = {
        False: probe(False, off_max, line=off_line, speeds=off_speeds, probe_id=1),
        True: probe(True, on_max, line=on_line, speeds=on_speeds, probe_id=2),
    }
    plan = make_plan(request(effective, memory_margin=0.0), probes)
    assert plan.gradient_checkpointing is expect_on
    assert plan.probe_id == (2 if expect_on else 1)
    assert plan.probe_ids == {"off": 1, "on": 2}
    assert plan.max_micro_batch_size == {"off": off_max, "on": on_max}
    assert "samples/s" in plan.reason
    assert plan.predicted_samples_per_second is not None
    assert any("gradient_checkpointing_enable" in hint for hint in plan.hints) == expect_on


@pytest.mark.parametrize(
    ("off_max", "on_max", "effective", "expect_on"),
    [
        pytest.param(40, 120, 256, False, id="off-fits-a-usable-batch"),
        pytest.param(8, 120, 256, False, id="off-fits-exactly-eight"),
        pytest.param(4, 120, 256, True, id="off-fits-too-small"),
        pytest.param(4, 120, 4, False, id="off-fits-the-whole-small-batch"),
        pytest.param(0, 120, 256, True, id="off-fits-nothing"),
    ],
)
def test_checkpointing_without_throughput_prefers_off_when_usable(
    off_max: int, on_max: int, effective: int, expect_on: bool
) -> None:
    probes = {False: probe(False, off_max, with_line=False), True: probe(True, on_max, with_line=False)}
    plan = make_plan(request(effective), probes)
    assert plan.gradient_checkpointing is expect_on
    assert plan.predicted_samples_per_second is None
    if off_max:
        assert "No throughput was measured" in plan.reason
    else:
        assert "fits nothing" in plan.reason


def test_policy_on_and_off_use_their_probe_only() -> None:
    probes = {False: probe(False, 16, with_line=False), True: probe(True, 64, with_line=False)}
    assert make_plan(request(64, gradient_checkpointing="off"), probes).micro_batch_size == 16
    on = make_plan(request(64, gradient_checkpointing="on"), probes)
    assert on.gradient_checkpointing and on.micro_batch_size == 64
    assert on.max_micro_batch_size == {"off": 16, "on": 64}
    assert "as the policy asks" in on.reason


# --- errors -------------------------------------------------------------------------------------


def test_effective_batch_smaller_than_world_size() -> None:
    with pytest.raises(PlanError, match=r"smaller than the world size \(8\)"):
        make_plan(request(4, 8), {False: probe(False, 32)})


def test_effective_batch_not_divisible_by_world_size() -> None:
    with pytest.raises(PlanError, match="use 96 or 104"):
        make_plan(request(100, 8, allow_uneven_micro_batches=True), {False: probe(False, 32)})


def test_missing_probe_for_the_policy() -> None:
    with pytest.raises(PlanError, match="needs a probe result with checkpointing on"):
        make_plan(request(64, gradient_checkpointing="on"), {False: probe(False, 32)})


def test_probe_under_the_wrong_key() -> None:
    with pytest.raises(PlanError, match="was run with checkpointing on"):
        make_plan(request(64), {False: probe(True, 32)})


def test_nothing_fits_either_way() -> None:
    with pytest.raises(NothingFitsError, match="with checkpointing off or checkpointing on"):
        make_plan(request(64), {False: probe(False, 0), True: probe(True, 0)})


def test_margin_can_leave_nothing() -> None:
    # Batch 1 fit the whole card, but a 30 % margin leaves less than its peak.
    line = MemoryLine(fixed_bytes=70 * GIB, per_sample_bytes=GIB)
    with pytest.raises(NothingFitsError, match="30% margin"):
        make_plan(request(8, memory_margin=0.3), {False: probe(False, 1, line=line)})


def test_probes_from_different_devices() -> None:
    other = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=40 * GIB)
    with pytest.raises(PlanError, match="different devices"):
        make_plan(request(64), {False: probe(False, 8), True: probe(True, 16, device=other)})


# --- examples -----------------------------------------------------------------------------------


def test_uneven_example_512_at_51() -> None:
    line = MemoryLine(fixed_bytes=4 * GIB, per_sample_bytes=GIB)
    plan = make_plan(
        request(512, allow_uneven_micro_batches=True, memory_margin=0.0), {False: probe(False, 51, line=line)}
    )
    assert plan.micro_batch_sizes == [47] * 6 + [46] * 5
    assert plan.micro_batch_size == 47 and plan.accumulation_steps == 11
    assert "6 micro-batches of 47 and 5 of 46" in plan.reason
    assert plan.predicted_peak_bytes == int(line.at(47))
    even = make_plan(request(512, memory_margin=0.0), {False: probe(False, 51, line=line)})
    assert (even.micro_batch_size, even.accumulation_steps) == (32, 16)
    assert has(even, "effective batches of 510 or 561 split evenly at 51, or allow uneven micro-batches")


def test_memory_budget_limits_below_the_probed_maximum() -> None:
    # The probe fit 70 (76 GiB reserved) but a 10 % margin leaves 72 GiB: 66 at most.
    line = MemoryLine(fixed_bytes=6 * GIB, per_sample_bytes=GIB)
    plan = make_plan(request(66, memory_margin=0.1), {False: probe(False, 70, line=line)})
    assert (plan.micro_batch_size, plan.accumulation_steps) == (66, 1)
    assert (
        make_plan(request(67, memory_margin=0.1), {False: probe(False, 70, line=line)}).micro_batch_size == 1
    )
    assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= plan.memory_budget_bytes
    assert "memory budget" in plan.reason


def test_without_a_line_a_measured_trial_over_budget_caps_the_batch() -> None:
    line = MemoryLine(fixed_bytes=6 * GIB, per_sample_bytes=GIB)
    result = probe(False, 70, line=line, with_line=False)  # trials at 35 (41 GiB) and 70 (76 GiB)
    plan = make_plan(request(69, memory_margin=0.1), {False: result})
    assert plan.micro_batch_size == 23  # largest divisor of 69 below 70
    assert plan.predicted_peak_bytes == int(line.at(35))  # the nearest larger measured trial


def test_plan_fields_come_from_the_probe() -> None:
    result = probe(False, 32, probe_id=7)
    plan = make_plan(request(256, 2), {False: result})
    assert plan.fingerprint == result.fingerprint
    assert plan.device == DEVICE and plan.backend == "cuda"
    assert plan.versions == {"torch": "2.13.0", "tuner": "0.1.0"}
    assert plan.probe_id == 7 and plan.probe_ids == {"off": 7}
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.world_size) == (32, 4, 2)
    assert any("no_sync" in hint for hint in plan.hints)


def test_request_device_other_than_the_probed_one_is_warned() -> None:
    req = parse_plan_request(
        {
            "workload": WORKLOAD,
            "effective_batch_size": 64,
            "device": {"name": "A100", "total_memory_bytes": 40 * GIB},
        }
    )
    plan = make_plan(req, {False: probe(False, 32)})
    assert plan.device == DEVICE
    assert has(plan, "the plan follows the probed device")


# --- ramp ---------------------------------------------------------------------------------------


def test_ramp_schedule_example() -> None:
    ramp = {"start_effective_batch_size": 64, "ramp_steps": 1000}
    plan = make_plan(request(512, ramp=ramp), {False: probe(False, 32)})
    assert plan.accumulation_steps == 16
    schedule = plan.accumulation_schedule
    assert schedule is not None
    assert schedule[0] == {"until_step": 72, "accumulation_steps": 2}  # 64 + 448 × 72/1000 ≥ 96
    assert schedule[-1] == {"until_step": 1000, "accumulation_steps": 15}
    assert [e["accumulation_steps"] for e in schedule] == list(range(2, 16))
    assert any("During the ramp" in hint for hint in plan.hints)


@settings(max_examples=200, deadline=None)
@given(
    micro=st.integers(1, 64),
    world=st.integers(1, 8),
    steps=st.integers(2, 2000),
    start=st.integers(1, 100_000),
    ramp_steps=st.integers(1, 100_000),
)
def test_ramp_schedule_properties(micro: int, world: int, steps: int, start: int, ramp_steps: int) -> None:
    effective = micro * world * steps
    assume(start < effective)
    schedule = ramp_schedule(
        RampSpec(start_effective_batch_size=start, ramp_steps=ramp_steps),
        micro_batch_size=micro,
        world_size=world,
        effective_batch_size=effective,
        accumulation_steps=steps,
    )
    assert 1 <= len(schedule) <= 256
    untils = [e["until_step"] for e in schedule]
    ks = [e["accumulation_steps"] for e in schedule]
    assert untils == sorted(set(untils)) and untils[-1] == ramp_steps and untils[0] > 0
    assert ks == sorted(set(ks)) and ks[-1] < steps and ks[0] >= 1
    # Never ahead of the linear ramp (beyond one window at its start).
    begin = 0
    for entry in schedule:
        linear = start + (effective - start) * begin / ramp_steps
        assert entry["accumulation_steps"] * micro * world <= max(linear, micro * world)
        begin = entry["until_step"]


def test_ramp_errors_and_warnings() -> None:
    with pytest.raises(PlanError, match="not below the target"):
        make_plan(
            request(256, ramp={"start_effective_batch_size": 256, "ramp_steps": 10}),
            {False: probe(False, 32)},
        )
    one_step = make_plan(
        request(32, ramp={"start_effective_batch_size": 8, "ramp_steps": 10}), {False: probe(False, 32)}
    )
    assert one_step.accumulation_schedule is None and has(one_step, "Ramp not applied")
    low = make_plan(
        request(256, ramp={"start_effective_batch_size": 8, "ramp_steps": 10}), {False: probe(False, 32)}
    )
    assert low.accumulation_schedule and low.accumulation_schedule[0]["accumulation_steps"] == 1
    assert has(low, "The ramp starts at an effective batch of 32")


def test_worked_example_of_the_docs() -> None:
    """docs/planner.md walks through this plan; the numbers there are these."""
    h100 = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
    off = probe(
        False,
        53,
        line=MemoryLine(3.0 * GIB, 1.45 * GIB),
        speeds={32: 96.0, 48: 101.0, 53: 100.5},
        device=h100,
    )
    on = probe(True, 150, line=MemoryLine(2.6 * GIB, 0.5 * GIB), speeds={96: 80.0, 150: 82.0}, device=h100)
    plan = make_plan(request(512), {False: off, True: on})
    assert plan.memory_budget_bytes == 80_766_618_828
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.gradient_checkpointing) == (32, 16, False)
    assert plan.predicted_samples_per_second == pytest.approx(96.0)
    assert "against 96.0 samples/s" in plan.reason and "81.2 samples/s (micro-batch 128)" in plan.reason
    assert "largest usable micro-batch is 49" in plan.reason
    assert has(plan, "effective batches of 490 or 539 split evenly at 49, or allow uneven micro-batches")
    assert not any("learning rate" in hint.lower() for hint in plan.hints)  # 16 × 32 may be the tuned batch

    uneven = make_plan(request(512, allow_uneven_micro_batches=True), {False: off, True: on})
    assert uneven.micro_batch_sizes == [47] * 6 + [46] * 5 and not uneven.warnings
    assert uneven.predicted_peak_bytes == pytest.approx(3.0 * GIB + 1.45 * GIB * 47, abs=1)
    assert uneven.predicted_samples_per_second == pytest.approx(100.5, abs=0.05)

    small = make_plan(request(96), {False: off, True: on})
    assert (small.micro_batch_size, small.accumulation_steps) == (48, 2)
    assert has(small, "an effective batch of 49 would need no accumulation")


def test_the_plan_says_when_expandable_segments_would_fit_a_larger_micro_batch() -> None:
    off = probe(False, 46)
    off = off.model_copy(update={"extra": {"expandable_segments_max_batch_size": 51}})
    plan = make_plan(request(46, gradient_checkpointing="off"), {False: off})
    hint = next(h for h in plan.hints if "expandable_segments:True" in h)
    assert "would be 51 instead of 46" in hint
    same = off.model_copy(update={"extra": {"expandable_segments_max_batch_size": 46}})
    hints = make_plan(request(46, gradient_checkpointing="off"), {False: same}).hints
    assert not any("expandable" in h for h in hints)


def test_the_plan_carries_the_allocator_setting_it_was_asked_for() -> None:
    planned = parse_plan_request(
        {
            "workload": WORKLOAD,
            "effective_batch_size": 32,
            "backend": "cuda",
            "policy": {"gradient_checkpointing": "off"},
            "alloc_conf": "expandable_segments:true",
        }
    )
    assert planned.alloc_conf == "expandable_segments:True"
    assert make_plan(planned, {False: probe(False, 40)}).alloc_conf == "expandable_segments:True"
