"""The planner: from probe results to the plan a training script applies (docs/planner.md).

Pure: plain data in (a `PlanRequest` and one `ProbeResult` per checkpointing choice), a `Plan`
out. No torch, no SQL, instant.

The objective, in order:

1. Hard constraints. Per rank, `micro_batch_size × accumulation_steps` is exactly the per-rank
   batch `effective_batch_size / world_size` (which must be an integer). The micro-batch never
   exceeds the largest batch that fit in the probe, the caller's `max_micro_batch_size`, nor the
   memory budget `device total × (1 − memory_margin)` as the probe's reserved-memory line (or a
   measured trial) predicts it.
2. Throughput. Where the probes measured samples/s, the plan with the highest predicted samples/s
   wins; predictions within `THROUGHPUT_TOLERANCE` of the best count as equal (measurement noise).
3. Among equals: the fewest accumulation steps (the largest micro-batch), then checkpointing off.
   Without measured throughput (the estimate backend) this is the whole objective.

Two rules refine it: 2 or 3 accumulation steps are only chosen when memory forces them (no larger
micro-batch with fewer steps fits), and under `auto` checkpointing is only chosen without
throughput data when checkpointing off cannot fit a usable micro-batch (`USABLE_BATCH`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from tuner.checkpointing import checkpointing_choices
from tuner.checkpointing import on_off as _label
from tuner.errors import NothingFitsError, PlanError
from tuner.plan_probes import ExtraProbes, budget_lengths
from tuner.results import LengthPoint, Plan, ProbeResult, TokenBudget
from tuner.search_types import Trial
from tuner.search_types import peak_of as _peak
from tuner.spec import DeviceSpec, PlanPolicy, PlanRequest, RampSpec, TokensInputs
from tuner.token_budget import describe_accumulation, token_accumulation, token_budget
from tuner.units import format_bytes

DEFAULT_MARGIN = PlanPolicy().memory_margin
"""The memory margin of a request that names none."""
THROUGHPUT_TOLERANCE = 0.02
"""Predicted samples/s this close (relative) to the best count as a tie."""
WELL_FITTING_FRACTION = 0.8
"""A split fits well when its micro-batch is at least this fraction of the largest usable one."""
USABLE_BATCH = 8
"""Without throughput data, checkpointing off is preferred when it fits this many samples (or the
whole per-rank batch, if smaller)."""
BATCHNORM_MIN_MICRO_BATCH = 8
"""BatchNorm statistics over fewer samples than this are too noisy."""
MAX_QUIET_ACCUMULATION = 64
"""More accumulation steps than this get a warning: updates become rare."""
MAX_RAMP_ENTRIES = 256
"""An accumulation schedule never has more entries than this (steps are coarsened)."""

ThroughputCurve = Callable[[int], float]
"""Predicted samples/s at a micro-batch size."""


@dataclass(frozen=True)
class Split:
    """How one rank's batch is cut into micro-batches."""

    micro_batch_size: int
    """The largest micro-batch (all of them, when even)."""
    accumulation_steps: int
    """Micro-batches per optimizer step."""
    sizes: tuple[int, ...] | None = None
    """Every micro-batch of one window, only when they differ in size."""

    @property
    def all_sizes(self) -> tuple[int, ...]:
        """The micro-batches of one window, even or not."""
        return self.sizes or (self.micro_batch_size,) * self.accumulation_steps


@dataclass(frozen=True)
class _Option:
    """One checkpointing choice with what its probe allows."""

    checkpointing: bool
    probe: ProbeResult
    usable: int
    """Largest micro-batch within the probe, the budget and the caller's cap (0: none)."""
    limited_by: str
    """What set `usable`, for the reason text."""
    throughput: ThroughputCurve | None


@dataclass(frozen=True)
class _Candidate:
    option: _Option
    split: Split
    poor_split: bool
    """No even split reaches `WELL_FITTING_FRACTION` of the usable micro-batch."""
    samples_per_second: float | None
    peak_bytes: int | None


def make_plan(
    request: PlanRequest, probes: Mapping[bool, ProbeResult], extras: ExtraProbes | None = None
) -> Plan:
    """The plan for `request` from the probe result of each checkpointing choice
    (`probes[False]`: checkpointing off, `probes[True]`: on; one or both as the policy needs),
    and, where the request asks for them (`tuner.plan_probes`), the eval probe (`policy.eval`)
    and the probes at the token budget's shorter lengths (`inputs.min_seq_len`).

    Raises `PlanError` when the request cannot be met by any split (effective batch smaller than,
    or not divisible by, the world size; a needed probe missing; a bad ramp) and
    `NothingFitsError` when not even a micro-batch of 1 fits the memory budget.
    """
    per_rank = per_rank_batch(request.effective_batch_size, request.world_size)
    chosen_probes = _probes_for_policy(request, probes)
    device = _common_device(chosen_probes)
    budget = memory_budget(device.total_memory_bytes, request.policy.memory_margin)
    options = [_option(gc, probe, budget, request.policy.max_micro_batch_size) for gc, probe in chosen_probes]
    fitting = [option for option in options if option.usable > 0]
    if not fitting:
        raise NothingFitsError(_nothing_fits_message(options, device, budget, request))
    candidates = [
        _candidate(option, per_rank, request.policy.allow_uneven_micro_batches) for option in fitting
    ]
    chosen, why = _choose(candidates, per_rank, request, probed=len(options))
    split = chosen.split
    schedule, ramp_warnings = _ramp(request, split)
    extras = extras or ExtraProbes()
    evaluation = _eval_micro_batch(request, extras, budget)
    tokens = _token_budget(request, extras, chosen.option, budget)
    extra_hints = [hint for hint in (evaluation.hint, tokens.hint) if hint]
    return Plan(
        fingerprint=chosen.option.probe.fingerprint,
        workload=request.workload,
        device=device,
        backend="estimate" if chosen.option.probe.backend == "estimate" else "cuda",  # cpu: refused above
        effective_batch_size=request.effective_batch_size,
        world_size=request.world_size,
        micro_batch_size=split.micro_batch_size,
        accumulation_steps=split.accumulation_steps,
        micro_batch_sizes=list(split.sizes) if split.sizes else None,
        gradient_checkpointing=chosen.option.checkpointing,
        max_micro_batch_size={_label(gc): probe.max_batch_size for gc, probe in sorted(probes.items())},
        memory_budget_bytes=budget,
        predicted_peak_bytes=chosen.peak_bytes,
        predicted_samples_per_second=chosen.samples_per_second,
        probe_id=chosen.option.probe.id,
        probe_ids={_label(gc): p.id for gc, p in sorted(probes.items()) if p.id is not None},
        policy=request.policy,
        reason=_reason(chosen, why, request, per_rank),
        warnings=_warnings(chosen, request, per_rank) + ramp_warnings + evaluation.warnings,
        hints=_hints(chosen, request) + extra_hints,
        accumulation_schedule=schedule,
        versions=dict(chosen.option.probe.versions),
        alloc_conf=request.alloc_conf,
        eval_micro_batch_size=evaluation.micro_batch_size,
        eval_predicted_peak_bytes=evaluation.peak_bytes,
        eval_probe_id=evaluation.probe_id,
        max_tokens_per_micro_batch=None
        if tokens.budget is None
        else tokens.budget.max_tokens_per_micro_batch,
        token_budget=tokens.budget,
        parallelism=request.chosen_parallelism,
        memory_per_rank=_memory_per_rank(chosen.option.probe),
    )


# --- eval micro-batch and token budget --------------------------------------------------------


@dataclass(frozen=True)
class _EvalPart:
    micro_batch_size: int | None = None
    peak_bytes: int | None = None
    probe_id: int | None = None
    hint: str | None = None
    warnings: list[str] = dataclass_field(default_factory=list)


def _eval_micro_batch(request: PlanRequest, extras: ExtraProbes, budget: int) -> _EvalPart:
    """With `policy.eval`: the largest eval batch within the memory budget, from the eval probe
    (no caller's cap: `max_micro_batch_size` bounds the training micro-batch)."""
    if not request.policy.eval:
        return _EvalPart()
    probe = extras.eval
    if probe is None:
        raise PlanError("policy.eval needs an eval probe (step 'eval'); none was given.")
    if probe.step != "eval":
        raise PlanError(f"The probe given for policy.eval ran the {probe.step} step, not the eval step.")
    usable, limited_by = bracketed_micro_batch(probe, budget)
    if usable < 1:
        return _EvalPart(
            probe_id=probe.id,
            warnings=[
                "policy.eval: not even an eval batch of 1 fits the memory budget with the training state "
                "resident; evaluate in a separate process, or free the optimizer state before evaluating."
            ],
        )
    return _EvalPart(
        micro_batch_size=usable,
        peak_bytes=bracketed_peak_bytes(probe, usable),
        probe_id=probe.id,
        hint=(
            f"Eval (not applied): an eval batch of {usable} fits beside the training state (set by "
            f"{limited_by}; forward only under torch.no_grad() in eval mode, parameters and optimizer "
            "state resident): per_device_eval_batch_size for HF Trainer, the eval DataLoader's batch_size "
            "otherwise."
        ),
    )


def _bracket(probe: ProbeResult, batch_size: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The nearest passing trials with measured reserved peaks at or below and above `batch_size`."""
    passing = sorted(
        (t.batch_size, int(t.peak_reserved_bytes))
        for t in probe.trials
        if t.ok and t.peak_reserved_bytes is not None
    )
    below = [point for point in passing if point[0] <= batch_size]
    above = [point for point in passing if point[0] > batch_size]
    if not below or not above:
        return None
    return below[-1], above[0]


def bracketed_micro_batch(probe: ProbeResult, budget_bytes: int, cap: int | None = None) -> tuple[int, str]:
    """`usable_micro_batch`, never above what the measured trials around it allow: where passing
    trials bracket the answer and the larger one exceeds the budget, memory between them is taken
    as the straight line through them, not the probe's fitted line (which, fitted far below, can
    run under both: the step's memory bends near the card's limit). Errs low."""
    usable, limited_by = usable_micro_batch(probe, budget_bytes, cap)
    bracket = _bracket(probe, usable)
    if bracket is None:
        return usable, limited_by
    (low, low_peak), (high, high_peak) = bracket
    if high_peak <= budget_bytes or low_peak > budget_bytes or usable == low:
        return usable, limited_by
    between = low + math.floor((budget_bytes - low_peak) * (high - low) / (high_peak - low_peak))
    return (between, "the memory budget") if between < usable else (usable, limited_by)


def bracketed_peak_bytes(probe: ProbeResult, batch_size: int) -> int | None:
    """`predicted_peak_bytes`, never below the straight line between the measured trials that
    bracket `batch_size` (memory grows with the batch)."""
    predicted = predicted_peak_bytes(probe, batch_size)
    bracket = _bracket(probe, batch_size)
    if bracket is None or predicted is None:
        return predicted
    (low, low_peak), (high, high_peak) = bracket
    if low == batch_size:
        return max(predicted, low_peak)
    between = low_peak + (high_peak - low_peak) * (batch_size - low) / (high - low)
    return max(predicted, math.ceil(between))


@dataclass(frozen=True)
class _TokensPart:
    budget: TokenBudget | None = None
    hint: str | None = None


def _token_budget(request: PlanRequest, extras: ExtraProbes, chosen: _Option, budget: int) -> _TokensPart:
    """With `inputs.min_seq_len`: the token budget of the chosen checkpointing choice, the smallest
    `largest batch × length` over the probed lengths (`tuner.token_budget`), and with
    `effective_tokens` how to reach it."""
    lengths = budget_lengths(request)
    inputs = request.workload.inputs
    if not lengths or not isinstance(inputs, TokensInputs) or inputs.min_seq_len is None:
        return _TokensPart()
    points: list[LengthPoint] = []
    for length in lengths:
        probe = (
            chosen.probe
            if length == inputs.seq_len
            else extras.lengths.get(length, {}).get(chosen.checkpointing)
        )
        if probe is None:
            raise PlanError(
                f"inputs.min_seq_len needs a probe at length {length} with checkpointing "
                f"{_label(chosen.checkpointing)}; none was given."
            )
        usable, _ = bracketed_micro_batch(probe, budget)
        points.append(
            LengthPoint(seq_len=length, max_batch_size=usable, tokens=usable * length, probe_id=probe.id)
        )
    found = token_budget({point.seq_len: point.max_batch_size for point in points})
    result = TokenBudget(
        min_seq_len=inputs.min_seq_len,
        seq_len=inputs.seq_len,
        max_tokens_per_micro_batch=found.max_tokens,
        limiting_seq_len=found.limiting_seq_len,
        lengths=points,
    )
    hint = (
        f"Token budget: a micro-batch may hold up to {found.max_tokens} padded tokens (rows × its "
        f"longest row) for any lengths from {inputs.min_seq_len} to {inputs.seq_len}; set by length "
        f"{found.limiting_seq_len}, probed with {', '.join(str(p.seq_len) for p in points)}."
    )
    if request.effective_tokens is not None:
        accumulation = token_accumulation(
            request.effective_tokens, request.world_size, max_tokens=found.max_tokens, seq_len=inputs.seq_len
        )
        result = result.model_copy(
            update={
                "effective_tokens": request.effective_tokens,
                "accumulation_steps": accumulation.accumulation_steps,
                "tokens_per_micro_batch": accumulation.tokens_per_micro_batch,
            }
        )
        hint = describe_accumulation(accumulation, found.max_tokens)
    return _TokensPart(budget=result, hint=hint)


def _memory_per_rank(probe: ProbeResult) -> dict[str, int] | None:
    """The probe's per-category bytes of one rank at its answer, where the estimate traced them."""
    categories = probe.extra.get("memory_per_rank")
    if not isinstance(categories, dict) or probe.max_batch_size < 1:
        return None
    return {"micro_batch_size": probe.max_batch_size, **{str(k): int(v) for k, v in categories.items()}}


# --- request checks ---------------------------------------------------------------------------


def per_rank_batch(effective_batch_size: int, world_size: int) -> int:
    """Samples each rank contributes to one optimizer step; it must be a whole number."""
    if effective_batch_size < world_size:
        raise PlanError(
            f"The effective batch ({effective_batch_size}) is smaller than the world size "
            f"({world_size}): every rank needs at least one sample per optimizer step."
        )
    if effective_batch_size % world_size:
        lower = effective_batch_size // world_size * world_size
        raise PlanError(
            f"The effective batch ({effective_batch_size}) is not divisible by the world size "
            f"({world_size}): every rank must take the same whole number of samples; "
            f"use {lower} or {lower + world_size}."
        )
    return effective_batch_size // world_size


def _probes_for_policy(
    request: PlanRequest, probes: Mapping[bool, ProbeResult]
) -> list[tuple[bool, ProbeResult]]:
    for key, probe in probes.items():
        if probe.backend == "cpu":
            raise PlanError(
                "A probe run on CPU (autotune without CUDA) measured no GPU memory: plan from a cuda "
                "probe of the device, or from an estimate."
            )
        if probe.gradient_checkpointing != key:
            raise PlanError(
                f"The probe given for checkpointing {_label(key)} was run with checkpointing "
                f"{_label(probe.gradient_checkpointing)}."
            )
    policy = request.policy.gradient_checkpointing
    wanted = checkpointing_choices(policy)
    chosen = [(gc, probes[gc]) for gc in wanted if gc in probes]
    if not chosen:
        needed = " or ".join(f"checkpointing {_label(gc)}" for gc in wanted)
        raise PlanError(
            f"Checkpointing policy {policy!r} needs a probe result with {needed}; none was given."
        )
    return chosen


def _common_device(probes: Sequence[tuple[bool, ProbeResult]]) -> DeviceSpec:
    devices = {probe.device for _, probe in probes}
    if len(devices) > 1:
        names = ", ".join(sorted(f"{d.name} ({d.total_memory_bytes} bytes)" for d in devices))
        raise PlanError(f"The probe results come from different devices ({names}); plan from one device.")
    return next(iter(devices))


# --- memory -----------------------------------------------------------------------------------


def memory_budget(total_memory_bytes: int, margin: float) -> int:
    """Bytes a plan may use: the device's memory less the policy's margin."""
    return int(total_memory_bytes * (1.0 - margin))


def usable_micro_batch(probe: ProbeResult, budget_bytes: int, cap: int | None = None) -> tuple[int, str]:
    """The largest micro-batch the plan may use with this probe, and what limits it.

    Never above the largest batch that fit (`probe.max_batch_size`) nor `cap`. Within that,
    measured beats predicted: a size at or below a passing trial whose reserved peak stayed within
    the budget is allowed; otherwise the size must be below every passing trial whose reserved
    peak exceeded the budget and the probe's reserved-memory line must predict a peak within the
    budget. Without a line, a trial over the budget limits the size to the largest measured one
    within it.
    """
    limit, limited_by = probe.max_batch_size, "the largest batch that fit"
    if cap is not None and cap <= limit:
        limit, limited_by = cap, "max_micro_batch_size"
    measured_ok = [t for t in probe.trials if t.ok and t.peak_reserved_bytes is not None]
    within = max((t.batch_size for t in measured_ok if _reserved(t) <= budget_bytes), default=0)
    over = min((t.batch_size for t in measured_ok if _reserved(t) > budget_bytes), default=None)
    if probe.memory_line is not None:
        by_line = probe.memory_line.largest_batch_under(budget_bytes)
        by_memory = max(within, by_line if over is None else min(by_line, over - 1))
    else:
        # Nothing predicts the sizes between the measured ones: stay at a measured size.
        by_memory = limit if over is None else within
    if by_memory < limit:
        limit, limited_by = by_memory, "the memory budget"
    return max(0, limit), limited_by


def predicted_peak_bytes(probe: ProbeResult, batch_size: int) -> int | None:
    """Peak reserved bytes at `batch_size`: a trial at that size if one passed; else the memory
    line, never above a passing trial at a larger size nor below one at a smaller size (memory
    grows with the batch; a line fitted near the boundary can slope oddly); else the nearest
    passing trial (the smallest larger one, or the largest smaller one)."""
    passing = [t for t in probe.trials if t.ok and _peak(t) is not None]
    exact = [_peak(t) for t in passing if t.batch_size == batch_size]
    if exact:
        return max(int(p) for p in exact if p is not None)
    above = [int(_peak(t) or 0) for t in passing if t.batch_size > batch_size]
    if probe.memory_line is not None:
        line = math.ceil(probe.memory_line.at(batch_size))
        floor = max((int(_peak(t) or 0) for t in passing if t.batch_size < batch_size), default=0)
        return max(floor, min([line, *above]))
    if above:
        return min(above)
    below = sorted((t for t in passing if t.batch_size < batch_size), key=lambda t: t.batch_size)
    return _peak(below[-1]) if below else None


def _reserved(trial: Trial) -> int:
    return int(trial.peak_reserved_bytes or 0)


# --- throughput -------------------------------------------------------------------------------


def throughput_curve(trials: Sequence[Trial]) -> ThroughputCurve | None:
    """Predicted samples/s at any micro-batch: linear between the passing trials that measured
    it (averaged per size), held flat beyond the smallest and the largest. None without any."""
    by_size: dict[int, list[float]] = {}
    for trial in trials:
        if trial.ok and trial.samples_per_second is not None:
            by_size.setdefault(trial.batch_size, []).append(trial.samples_per_second)
    if not by_size:
        return None
    points = sorted((size, sum(values) / len(values)) for size, values in by_size.items())

    def at(batch_size: int) -> float:
        if batch_size <= points[0][0]:
            return points[0][1]
        for (b0, s0), (b1, s1) in itertools.pairwise(points):
            if batch_size <= b1:
                return s0 + (s1 - s0) * (batch_size - b0) / (b1 - b0)
        return points[-1][1]

    return at


def split_samples_per_second(split: Split, curve: ThroughputCurve) -> float:
    """Samples/s over one window: its samples over the time its micro-batches take."""
    sizes = split.all_sizes
    return sum(sizes) / sum(size / max(curve(size), 1e-12) for size in sizes)


# --- splitting one rank's batch ---------------------------------------------------------------


def divisors_up_to(number: int, limit: int) -> list[int]:
    """Divisors of `number` that are at most `limit`, ascending."""
    found: set[int] = set()
    for low in range(1, math.isqrt(number) + 1):
        if number % low == 0:
            found.update((low, number // low))
    return sorted(d for d in found if d <= limit)


def is_poor_split(per_rank: int, usable: int) -> bool:
    """True when the largest even micro-batch is below `WELL_FITTING_FRACTION` of the largest
    usable one (or of the whole per-rank batch, when that is smaller)."""
    best = divisors_up_to(per_rank, usable)[-1]
    reachable = min(usable, per_rank)
    return best < WELL_FITTING_FRACTION * reachable


def uneven_split(per_rank: int, usable: int) -> Split:
    """The fewest micro-batches of at most `usable` that sum to `per_rank`, balanced so that
    they differ by at most one sample (512 at ≤ 51: 6 × 47 + 5 × 46, not 10 × 51 + 2, which
    has as many steps but one tiny micro-batch)."""
    steps = -(-per_rank // usable)
    base, extra = divmod(per_rank, steps)
    if extra == 0:
        return Split(base, steps)
    return Split(base + 1, steps, (base + 1,) * extra + (base,) * (steps - extra))


def split_per_rank_batch(
    per_rank: int, usable: int, *, allow_uneven: bool = False, throughput: ThroughputCurve | None = None
) -> Split:
    """Cut one rank's batch into micro-batches of at most `usable` by the module's objective.

    Even splits use a divisor of `per_rank`. With `allow_uneven`, a poor even split (see
    `is_poor_split`) is replaced by `uneven_split` when that needs fewer steps.
    """
    divisors = divisors_up_to(per_rank, usable)
    fewest_steps = per_rank // divisors[-1]
    if allow_uneven and is_poor_split(per_rank, usable):
        uneven = uneven_split(per_rank, usable)
        if uneven.accumulation_steps < fewest_steps:
            return uneven
    if throughput is None:
        return Split(divisors[-1], fewest_steps)
    # 2 or 3 steps only where memory forces them: never trade a single step for a faster size.
    allowed = [d for d in divisors if per_rank // d == fewest_steps or per_rank // d not in (2, 3)]
    best = max(throughput(d) for d in allowed)
    micro = max(d for d in allowed if throughput(d) >= best * (1 - THROUGHPUT_TOLERANCE))
    return Split(micro, per_rank // micro)


# --- choosing ---------------------------------------------------------------------------------


def _option(checkpointing: bool, probe: ProbeResult, budget: int, cap: int | None) -> _Option:
    # Bracketed: between two measured trials the memory is their straight line, wherever the
    # fitted line runs under both (a step's memory can bend up near the card's limit).
    usable, limited_by = bracketed_micro_batch(probe, budget, cap)
    return _Option(checkpointing, probe, usable, limited_by, throughput_curve(probe.trials))


def _candidate(option: _Option, per_rank: int, allow_uneven: bool) -> _Candidate:
    split = split_per_rank_batch(
        per_rank, option.usable, allow_uneven=allow_uneven, throughput=option.throughput
    )
    speed = split_samples_per_second(split, option.throughput) if option.throughput else None
    return _Candidate(
        option=option,
        split=split,
        poor_split=is_poor_split(per_rank, option.usable),
        samples_per_second=speed,
        peak_bytes=bracketed_peak_bytes(option.probe, split.micro_batch_size),
    )


def _choose(
    candidates: Sequence[_Candidate], per_rank: int, request: PlanRequest, *, probed: int
) -> tuple[_Candidate, str]:
    """The candidate to plan with, and why (one sentence)."""
    if len(candidates) == 1:
        state = _label(candidates[0].option.checkpointing)
        if request.policy.gradient_checkpointing != "auto":
            return candidates[0], f"Checkpointing is {state} as the policy asks."
        other = "fits nothing within the memory budget" if probed > 1 else "was not probed"
        return candidates[0], f"Checkpointing is {state}: the other choice {other}."
    off, on = sorted(candidates, key=lambda c: c.option.checkpointing)
    if off.samples_per_second is not None and on.samples_per_second is not None:
        faster = on.samples_per_second > off.samples_per_second * (1 + THROUGHPUT_TOLERANCE)
        verdict = "is faster, so checkpointing is on" if faster else "is not faster, so checkpointing is off"
        return (on if faster else off), (
            f"With checkpointing the predicted throughput is {on.samples_per_second:.1f} samples/s "
            f"(micro-batch {on.split.micro_batch_size}) against {off.samples_per_second:.1f} samples/s "
            f"without (micro-batch {off.split.micro_batch_size}): it {verdict}."
        )
    enough = min(USABLE_BATCH, per_rank)
    if off.option.usable >= enough or off.option.usable >= on.option.usable:
        return off, (
            f"No throughput was measured; without checkpointing a micro-batch of {off.option.usable} fits "
            f"(at least {enough} is usable), so checkpointing stays off, avoiding its recomputation cost."
        )
    return on, (
        f"No throughput was measured; without checkpointing only a micro-batch of {off.option.usable} fits "
        f"(below {enough}), with it {on.option.usable}, so checkpointing is on."
    )


def _reason(chosen: _Candidate, why: str, request: PlanRequest, per_rank: int) -> str:
    option, split = chosen.option, chosen.split
    sizes = describe_split(split)
    return (
        f"{why} The largest usable micro-batch is {option.usable} (set by {option.limited_by}); "
        f"each of {request.world_size} rank(s) takes {per_rank} samples per step as {sizes}, "
        f"the fewest accumulation steps that reach it exactly"
        + (
            " among the splits with the best predicted samples/s."
            if chosen.samples_per_second is not None
            else "."
        )
    )


# --- warnings and hints -----------------------------------------------------------------------


def _warnings(chosen: _Candidate, request: PlanRequest, per_rank: int) -> list[str]:
    split, option = chosen.split, chosen.option
    warnings: list[str] = []
    facts = option.probe.facts
    smallest = min(split.all_sizes)
    if facts is not None and facts.has_batchnorm and smallest < BATCHNORM_MIN_MICRO_BATCH:
        warnings.append(
            f"BatchNorm with a micro-batch of {smallest} (below {BATCHNORM_MIN_MICRO_BATCH}): its batch "
            "statistics are noisy and gradient accumulation does not enlarge them; use GroupNorm or "
            "LayerNorm" + (", or SyncBatchNorm across the ranks." if request.world_size > 1 else ".")
        )
    steps = split.accumulation_steps
    if steps > MAX_QUIET_ACCUMULATION:
        warnings.append(
            f"Accumulation steps: {steps} (more than {MAX_QUIET_ACCUMULATION}) make optimizer updates "
            "rare; consider a smaller effective batch, gradient checkpointing or more devices."
        )
    if steps in (2, 3):
        no_accumulation = option.usable * request.world_size
        warnings.append(
            f"Accumulation of only {steps} steps, forced because a micro-batch of {per_rank} is not usable "
            f"(at most {option.usable}, set by {option.limited_by}); an effective batch of "
            f"{no_accumulation} would need no accumulation."
        )
    if chosen.poor_split and split.sizes is None:
        warnings.append(_not_reachable_warning(chosen, request, per_rank))
    if (
        request.device is not None
        and request.device.total_memory_bytes != option.probe.device.total_memory_bytes
    ):
        warnings.append(
            f"The request names {request.device.name} ({format_bytes(request.device.total_memory_bytes)}) "
            f"but the probes ran on {option.probe.device.name} "
            f"({format_bytes(option.probe.device.total_memory_bytes)}); the plan follows the probed device."
        )
    return warnings


def _not_reachable_warning(chosen: _Candidate, request: PlanRequest, per_rank: int) -> str:
    usable, world, split = chosen.option.usable, request.world_size, chosen.split
    best = divisors_up_to(per_rank, usable)[-1]
    lower_steps = per_rank // usable
    upper_steps = lower_steps + 1
    around = [k * usable * world for k in (lower_steps, upper_steps) if k > 0]
    alternatives = " or ".join(str(n) for n in around)
    uneven = "" if request.policy.allow_uneven_micro_batches else ", or allow uneven micro-batches"
    return (
        f"Effective batch {request.effective_batch_size} is not reachable exactly with a micro-batch near "
        f"the largest usable ({usable}): the largest even split of {per_rank} per rank is {best}, so the "
        f"plan uses {describe_split(split)}; effective batches of "
        f"{alternatives} split evenly at {usable}{uneven}."
    )


def _hints(chosen: _Candidate, request: PlanRequest) -> list[str]:
    split, effective = chosen.split, request.effective_batch_size
    hints: list[str] = []
    # No learning-rate scaling hint: a factor means something only against the batch the rate was
    # tuned at, which the request does not say (MiniMind's 32 × 8 plan is its own batch: ×1, not ×8).
    if split.sizes:
        hints.append(
            "Micro-batches differ in size: sum the loss over each micro-batch's items and divide by the "
            "item count of the whole window (tuner.training.GradientAccumulator.backward(loss_sum, "
            "num_items)); a mean per micro-batch divided by the step count would bias the gradient."
        )
    if split.accumulation_steps > 1 and request.world_size > 1:
        hints.append(
            "Under DDP, skip the gradient all-reduce on all but the last micro-batch of a window "
            "(no_sync(); GradientAccumulator does this)."
        )
    if chosen.option.checkpointing:
        hints.append(
            "Turn on gradient checkpointing: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False}) for transformers models that "
            "support it; for others (a custom-code model such as MiniMind's, which refuses it) "
            "tuner.training.checkpoint_blocks(model), which runs each repeated block through "
            "torch.utils.checkpoint as the probe did (before wrapping the model in DDP)."
        )
    if request.policy.ramp is not None:
        start = request.policy.ramp.start_effective_batch_size
        hints.append(
            f"During the ramp the effective batch grows from about {start} to {effective}; the learning "
            f"rate usually follows it (linear rule lr × b/{effective}, or square-root rule "
            f"lr × sqrt(b/{effective})); not applied."
        )
    expandable = chosen.option.probe.extra.get("expandable_segments_max_batch_size")
    if isinstance(expandable, int) and expandable > chosen.option.probe.max_batch_size:
        hints.append(
            f"Allocator (not applied): with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True the largest "
            f"micro-batch would be {expandable} instead of {chosen.option.probe.max_batch_size} "
            f"(checkpointing {_label(chosen.option.checkpointing)}): the caching allocator then strands no "
            "free memory at the ends of its segments. Set it before the process first uses CUDA and plan "
            "with alloc_conf 'expandable_segments:True'."
        )
    assumptions = chosen.option.probe.extra.get("estimate_assumptions")
    if isinstance(assumptions, list) and assumptions:
        hints.append(
            "The estimate assumed what its trace could not read from tensor values: "
            + "; ".join(str(a) for a in assumptions)
            + "."
        )
    if chosen.option.probe.backend == "estimate":
        hints.append(
            "Estimated without a GPU: confirm the micro-batch with a short run on the target device "
            "before relying on it near the limit."
        )
    return hints


# --- ramp -------------------------------------------------------------------------------------


def _ramp(request: PlanRequest, split: Split) -> tuple[list[dict[str, int]] | None, list[str]]:
    ramp = request.policy.ramp
    if ramp is None:
        return None, []
    if ramp.start_effective_batch_size >= request.effective_batch_size:
        raise PlanError(
            f"The ramp starts at an effective batch of {ramp.start_effective_batch_size}, which is not "
            f"below the target {request.effective_batch_size}."
        )
    if split.accumulation_steps == 1:
        return None, [
            "Ramp not applied: the effective batch takes one micro-batch per rank, so a ramp at a fixed "
            "micro-batch has no accumulation steps to grow."
        ]
    window = split.micro_batch_size * request.world_size
    warnings = []
    if ramp.start_effective_batch_size < window:
        warnings.append(
            f"The ramp starts at an effective batch of {window} (one micro-batch of "
            f"{split.micro_batch_size} on each of {request.world_size} rank(s)), not "
            f"{ramp.start_effective_batch_size}: the micro-batch is fixed."
        )
    schedule = ramp_schedule(
        ramp,
        micro_batch_size=split.micro_batch_size,
        world_size=request.world_size,
        effective_batch_size=request.effective_batch_size,
        accumulation_steps=split.accumulation_steps,
    )
    return schedule, warnings


def ramp_schedule(
    ramp: RampSpec,
    *,
    micro_batch_size: int,
    world_size: int,
    effective_batch_size: int,
    accumulation_steps: int,
) -> list[dict[str, int]]:
    """A linear batch-size ramp as accumulation steps at a fixed micro-batch.

    Entry `{"until_step": s, "accumulation_steps": k}` applies to optimizer steps from the
    previous entry's `until_step` (0 for the first) up to, not including, `s`; from the last
    `until_step` (= `ramp.ramp_steps`) on, the plan's `accumulation_steps` apply. At step `t`
    the ramp's effective batch is `start + (target − start) × t / ramp_steps`, rounded down to
    whole windows of `micro_batch_size × world_size` (at least one), so it never runs ahead.
    """
    start, total = ramp.start_effective_batch_size, ramp.ramp_steps
    window = micro_batch_size * world_size
    first = max(1, start // window)
    stride = max(1, -(-(accumulation_steps - first) // MAX_RAMP_ENTRIES))

    def first_step_with(steps: int) -> int:
        """The first optimizer step whose ramp batch reaches `steps` windows."""
        needed = steps * window - start
        return min(total, max(0, -(-(total * needed) // (effective_batch_size - start))))

    schedule: list[dict[str, int]] = []
    for steps in range(first, accumulation_steps, stride):
        until = first_step_with(min(steps + stride, accumulation_steps))
        begins = schedule[-1]["until_step"] if schedule else 0
        if until > begins:
            schedule.append({"until_step": until, "accumulation_steps": steps})
    return schedule


def describe_split(split: Split) -> str:
    """`16 micro-batches of 32`, or `6 micro-batches of 47 and 5 of 46` when uneven."""
    counts: dict[int, int] = {}
    for size in split.all_sizes:
        counts[size] = counts.get(size, 0) + 1
    (first, first_count), *rest = counts.items()
    noun = "micro-batches" if first_count > 1 else "micro-batch"
    return " and ".join([f"{first_count} {noun} of {first}", *(f"{n} of {size}" for size, n in rest)])


def _nothing_fits_message(
    options: Sequence[_Option], device: DeviceSpec, budget: int, request: PlanRequest
) -> str:
    return nothing_fits_message(
        {option.checkpointing: option.probe for option in options}, memory_margin=request.policy.memory_margin
    )


def nothing_fits_message(probes: Mapping[bool, ProbeResult], *, memory_margin: float = DEFAULT_MARGIN) -> str:
    """Why no plan fits, in one sentence: what a micro-batch of 1 needs with each checkpointing
    choice probed, against what the card offers the allocator and the plan's memory budget; for a
    card whose whole memory the CUDA context takes, that instead."""
    ordered = [probe for _, probe in sorted(probes.items())]
    device = ordered[0].device
    total = device.total_memory_bytes
    capacities = [probe.capacity_bytes for probe in ordered if probe.capacity_bytes is not None]
    capacity = min(capacities) if capacities else None
    if capacity is not None and capacity <= 0:
        return (
            f"Nothing fits: {device.name} has {format_bytes(total)} in all, less than the CUDA context, "
            "libraries and kernels take before the first tensor (nothing is left for the allocator), "
            "so not even a micro-batch of 1 can train on it."
        )
    tried = " or ".join(f"checkpointing {_label(probe.gradient_checkpointing)}" for probe in ordered)
    needs = [(probe, smallest_batch_need(probe)) for probe in ordered]
    known = [(probe, need) for probe, need in needs if need is not None]
    if known:
        how = "estimated" if all(probe.backend == "estimate" for probe, _ in known) else "measured"
        amounts = " and ".join(
            format_bytes(need)
            + (f" with checkpointing {_label(probe.gradient_checkpointing)}" if len(ordered) > 1 else "")
            for probe, need in known
        )
        needed = f"it needs {amounts} of reserved memory ({how})"
    else:
        needed = "it ran out of memory before its peak was measured"
    if capacity is not None and capacity < total:
        offered = (
            f"the {format_bytes(capacity)} the card leaves the allocator after the CUDA context and kernels "
            f"({format_bytes(total)} in all)"
        )
    else:
        offered = f"the card's {format_bytes(total)}"
    budget = memory_budget(total, memory_margin)
    return (
        f"Nothing fits: not even a micro-batch of 1 fits {device.name} with {tried}: {needed}, against "
        f"{offered} and a memory budget of {format_bytes(budget)} ({memory_margin:.0%} margin)."
    )


def smallest_batch_need(probe: ProbeResult) -> int | None:
    """Peak reserved bytes of the probe's smallest micro-batch (a measured or estimated trial, else
    the memory line at 1); None where it ran out of memory before its peak was known."""
    smallest = min((trial.batch_size for trial in probe.trials), default=1)
    peaks = [_peak(trial) for trial in probe.trials if trial.batch_size == smallest]
    known = [int(peak) for peak in peaks if peak is not None]
    if known:
        return max(known)
    if probe.memory_line is not None:
        return math.ceil(probe.memory_line.at(smallest))
    return None
