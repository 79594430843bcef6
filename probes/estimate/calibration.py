"""The device model, fitted on real GPU runs: traces of every calibration trial replayed through
the caching-allocator model with the history each trial really had.

The calibration file (`../shared/calibration/h100-gpt2.json`) holds sets of real trials of one
workload each: every trial's `max_memory_allocated` and `max_memory_reserved`, whether it ran out
of memory, and how the set was run. Two histories occur:

- *fresh*: each batch size in a fresh process (a training script's start);
- *in process*: the trials in the order listed in one process, the model and its optimizer
  kept from the first trial on, `empty_cache()` between trials. The optimizer's state then lives
  where the first (smallest) trial's allocator put it, which changes later trials' fragmentation.

`calibrate` replays each set as it ran and fits what the allocator model cannot know:

- `persistent_untracked_bytes`: real allocated bytes after the first step less the replay's;
- `activation_slack` (and `activation_slack_checkpointing`): the largest gap between real and
  replayed allocated bytes of a passing trial, as a fraction of its traced activations at the peak;
- `context_overhead_bytes`: the card's total memory less the allocator capacity: the smallest at
  which every passing trial passes its replay when that keeps every failure failing
  (`Calibration.consistent`), else the largest at which every failure fails (passes that then fail
  err low, and are listed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from probes.estimate.allocator import (
    AllocationLog,
    AllocatorStats,
    CachingAllocatorModel,
    replay,
    smallest_passing_capacity,
)
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL, DeviceModel, compute_dtype_bytes
from tuner.alloc_conf import AllocatorSettings, canonical_alloc_conf, parse_alloc_conf
from tuner.spec import WorkloadSpec, parse_workload

MIB = 1 << 20
CAPACITY_PRECISION = 2 * MIB
"""How finely a trial's needed capacity is bisected: the allocator's segment granularity."""


@dataclass(frozen=True)
class RealTrial:
    """One measured trial."""

    batch_size: int
    ok: bool
    max_allocated_bytes: int
    max_reserved_bytes: int


@dataclass(frozen=True)
class CalibrationSet:
    """Real trials of one workload, checkpointing choice and allocator setting."""

    name: str
    spec: WorkloadSpec
    gradient_checkpointing: bool
    alloc_conf: str | None
    fresh_process: bool
    """True: each trial in its own process; False: all in one process, in order."""
    trials: tuple[RealTrial, ...]
    allocated_after_first_step_bytes: int | None = None


@dataclass(frozen=True)
class CalibrationData:
    """A calibration file: the card and its sets."""

    device_name: str
    total_memory_bytes: int
    free_before_model_bytes: int
    sets: tuple[CalibrationSet, ...]


def load_calibration(path: str | Path) -> CalibrationData:
    """Read a calibration file (the format of ../shared/calibration/h100-gpt2.json)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    sets = []
    for index, raw in enumerate(data["sets"]):
        keeps = raw["loop"] == "keeps_outputs"
        spec = parse_workload({**raw["spec"], "loop": {"keeps_outputs": keeps}})
        checkpointing = bool(raw["gradient_checkpointing"])
        conf = canonical_alloc_conf(raw.get("PYTORCH_CUDA_ALLOC_CONF"))
        sets.append(
            CalibrationSet(
                name=(
                    f"{index}: {raw['loop']}, {spec.precision}, "
                    f"checkpointing {'on' if checkpointing else 'off'}{', ' + conf if conf else ''}"
                ),
                spec=spec,
                gradient_checkpointing=checkpointing,
                alloc_conf=conf,
                fresh_process="fresh process" in str(raw.get("note", "")),
                trials=tuple(
                    RealTrial(
                        batch_size=int(t["batch_size"]),
                        ok=bool(t["ok"]),
                        max_allocated_bytes=int(t["max_memory_allocated"]),
                        max_reserved_bytes=int(t["max_memory_reserved"]),
                    )
                    for t in raw["trials"]
                ),
                allocated_after_first_step_bytes=raw.get("allocated_after_first_step_bytes"),
            )
        )
    device = data["device"]
    return CalibrationData(
        device_name=str(device["name"]),
        total_memory_bytes=int(device["total_memory_bytes"]),
        free_before_model_bytes=int(device["free_bytes_before_model"]),
        sets=tuple(sets),
    )


@dataclass(frozen=True)
class TracedTrial:
    """What the estimator needs of one trial's trace."""

    log: AllocationLog
    activation_bytes: int
    """Traced activations at the peak."""
    traced_peak_bytes: int


Tracer = Callable[[WorkloadSpec, int, bool], TracedTrial]
"""(spec, batch size, checkpointing) → the trace; `probes.estimate.session` supplies one."""


@dataclass(frozen=True)
class Point:
    """One real trial next to its replay."""

    set_name: str
    batch_size: int
    ok: bool
    real_allocated_bytes: int
    real_reserved_bytes: int
    traced_peak_bytes: int
    model_allocated_bytes: int
    """Replayed allocated peak, with the workspaces, before the activation slack."""
    model_reserved_bytes: int
    activation_bytes: int
    needed_capacity_bytes: int | None = None
    """The smallest allocator capacity at which the replay passes (bisected where it matters)."""


@dataclass
class Calibration:
    """The fit: the device model and every point it came from."""

    device_model: DeviceModel
    points: list[Point] = field(default_factory=list)
    capacity_low_bytes: int = 0
    """The smallest capacity at which every passing trial passes (the fit's capacity)."""
    capacity_high_bytes: int | None = None
    """The smallest capacity any failing trial needed: the fit is consistent below it."""
    untracked_by_set: dict[str, int] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        """Whether one capacity passes every real pass and fails every real failure."""
        return self.capacity_high_bytes is None or self.capacity_low_bytes < self.capacity_high_bytes


def replay_set(
    cal_set: CalibrationSet,
    traces: dict[int, TracedTrial],
    device_model: DeviceModel,
    *,
    needs: Iterable[int] = (),
) -> list[Point]:
    """Replay a set's trials with the history they had; for the batch sizes in `needs`, also
    bisect the allocator capacity each needed.

    In process, every trial after the first finds the model and optimizer state where the first
    trial's allocator put them, and an emptied cache: what each trial leaves beyond that is freed
    at its end and returned by `empty_cache()`, so the first trial is the history that counts."""
    settings = parse_alloc_conf(cal_set.alloc_conf)
    wanted = set(needs)
    first = cal_set.trials[0]
    points = []
    for real in cal_set.trials:
        traced = traces[real.batch_size]
        warmup = None if cal_set.fresh_process or real is first else traces[first.batch_size].log

        def run(
            capacity: int | None, log: AllocationLog = traced.log, warm: AllocationLog | None = warmup
        ) -> AllocatorStats:
            return replay(
                log,
                settings,
                capacity_bytes=capacity,
                preallocated_bytes=device_model.persistent_untracked_bytes,
                warmup=warm,
            )

        unbounded = run(None)
        needed = None
        if real.batch_size in wanted:
            slack = device_model.slack_bytes(
                traced.activation_bytes,
                gradient_checkpointing=cal_set.gradient_checkpointing,
                compute_dtype_bytes=compute_dtype_bytes(cal_set.spec.precision),
            )
            low = unbounded.peak_allocated_bytes - CAPACITY_PRECISION
            fits = lambda capacity: not run(capacity).out_of_memory  # noqa: E731
            needed = slack + smallest_passing_capacity(
                fits, low, unbounded.peak_reserved_bytes, precision=CAPACITY_PRECISION
            )
        points.append(
            Point(
                set_name=cal_set.name,
                batch_size=real.batch_size,
                ok=real.ok,
                real_allocated_bytes=real.max_allocated_bytes,
                real_reserved_bytes=real.max_reserved_bytes,
                traced_peak_bytes=traced.traced_peak_bytes,
                model_allocated_bytes=unbounded.peak_allocated_bytes,
                model_reserved_bytes=unbounded.peak_reserved_bytes,
                activation_bytes=traced.activation_bytes,
                needed_capacity_bytes=needed,
            )
        )
    return points


def calibrate(data: CalibrationData, tracer: Tracer, base: DeviceModel = DEFAULT_DEVICE_MODEL) -> Calibration:
    """Fit the device model on a calibration file (module docstring); `tracer` traces a trial."""
    data = replace(data, sets=tuple(_deciding_trials(s) for s in data.sets))
    traces = {
        cal_set.name: {
            real.batch_size: tracer(cal_set.spec, real.batch_size, cal_set.gradient_checkpointing)
            for real in cal_set.trials
        }
        for cal_set in data.sets
    }
    # 1. Workspaces: what the first step leaves allocated beyond the replay's parameters and state.
    untracked = {}
    for cal_set in data.sets:
        if cal_set.allocated_after_first_step_bytes is None:
            continue
        first = traces[cal_set.name][cal_set.trials[0].batch_size].log
        replayed = _allocated_after_first_step(first, parse_alloc_conf(cal_set.alloc_conf))
        untracked[cal_set.name] = cal_set.allocated_after_first_step_bytes - replayed
    model = base
    if untracked:
        model = replace(model, persistent_untracked_bytes=max(0, max(untracked.values())))
    # 2. Activation slack: the largest relative gap of a passing trial's allocated bytes, with and
    # without checkpointing.
    model = replace(model, activation_slack=0.0, activation_slack_checkpointing=0.0)
    unslacked = [(s, p) for s in data.sets for p in replay_set(s, traces[s.name], model)]
    slack: dict[bool, float] = {}
    for checkpointing in (False, True):
        fractions = [
            (p.real_allocated_bytes - p.model_allocated_bytes)
            / (p.activation_bytes * compute_dtype_bytes(s.spec.precision) / 2)
            for s, p in unslacked
            if s.gradient_checkpointing == checkpointing and p.ok and p.activation_bytes > 0
        ]
        kept = base.activation_slack_checkpointing if checkpointing else base.activation_slack
        slack[checkpointing] = max(0.0, *fractions) if fractions else kept
    model = replace(model, activation_slack=slack[False], activation_slack_checkpointing=slack[True])
    # 3. Capacity, bisected where it decides: per set the largest pass and the two smallest failures.
    points: list[Point] = []
    for cal_set in data.sets:
        plain = replay_set(cal_set, traces[cal_set.name], model)
        passes = sorted((p for p in plain if p.ok), key=lambda p: p.model_reserved_bytes)[-1:]
        failures = sorted((p for p in plain if not p.ok), key=lambda p: p.model_reserved_bytes)[:2]
        needs = {p.batch_size for p in (*passes, *failures)}
        points.extend(replay_set(cal_set, traces[cal_set.name], model, needs=needs))
    passing = [p.needed_capacity_bytes for p in points if p.ok and p.needed_capacity_bytes is not None]
    failing = [p.needed_capacity_bytes for p in points if not p.ok and p.needed_capacity_bytes is not None]
    low = max(passing, default=data.free_before_model_bytes)
    high = min(failing, default=None)
    # Every real failure must fail (a predicted pass above the truth is an OOM in someone's run); a
    # real pass may then fail, which errs low and shows in the points.
    capacity = low if high is None or low < high else high - CAPACITY_PRECISION
    model = replace(model, context_overhead_bytes=data.total_memory_bytes - capacity)
    return Calibration(
        device_model=model,
        points=points,
        capacity_low_bytes=low,
        capacity_high_bytes=high,
        untracked_by_set=untracked,
    )


def _deciding_trials(cal_set: CalibrationSet) -> CalibrationSet:
    """The set without the failures far above the boundary: a failure's measured peaks stop where
    it ran out, and only the two smallest failures can decide the capacity."""
    smallest_failures = sorted(t.batch_size for t in cal_set.trials if not t.ok)[:2]
    kept = tuple(t for t in cal_set.trials if t.ok or t.batch_size in smallest_failures)
    return replace(cal_set, trials=kept)


# ------------------------------------------------------------------------------- replays


def _allocated_after_first_step(log: AllocationLog, settings: AllocatorSettings) -> int:
    allocator = CachingAllocatorModel(settings)
    stop = log.iteration_starts[1] if len(log.iteration_starts) > 1 else len(log)
    for storage, nbytes in zip(log.storages[:stop], log.sizes[:stop], strict=True):
        if nbytes < 0:
            allocator.free(storage)
        else:
            allocator.malloc(storage, nbytes)
    return allocator.allocated_bytes
