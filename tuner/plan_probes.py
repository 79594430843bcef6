"""Which probes a plan request needs, and the probes found for it: pure, no torch, no SQL.

Every request needs the train probe of each checkpointing choice its policy names. `policy.eval`
adds one eval probe (`step="eval"`, checkpointing off: without gradients there is nothing to
recompute). `inputs.min_seq_len` adds, per checkpointing choice, a train probe at each length of
the token budget below `seq_len` (`tuner.token_budget.lengths_to_probe`); each is an ordinary
probe of the workload at that fixed length, cached under that workload's own fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from tuner.checkpointing import checkpointing_choices as choices_of_policy
from tuner.checkpointing import on_off
from tuner.results import ProbeResult
from tuner.spec import PlanRequest, StepKind, TokensInputs, WorkloadSpec
from tuner.token_budget import lengths_to_probe

ProbeRole = Literal["train", "eval", "length"]
"""`train` (the plan's own probes), `eval`, or `length` (a token budget's shorter lengths)."""


@dataclass(frozen=True)
class ProbeNeed:
    """One probe a plan needs."""

    workload: WorkloadSpec
    gradient_checkpointing: bool
    step: StepKind = "train"
    role: ProbeRole = "train"

    @property
    def seq_len(self) -> int | None:
        inputs = self.workload.inputs
        return inputs.seq_len if isinstance(inputs, TokensInputs) else None

    def describe(self) -> str:
        """`eval`, `checkpointing off`, `length 64, checkpointing on`: for progress and errors."""
        checkpointing = f"checkpointing {on_off(self.gradient_checkpointing)}"
        if self.role == "eval":
            return "eval"
        if self.role == "length":
            return f"length {self.seq_len}, {checkpointing}"
        return checkpointing


def checkpointing_choices(request: PlanRequest) -> list[bool]:
    """The checkpointing choices the request's policy needs a probe for, off first."""
    return list(choices_of_policy(request.policy.gradient_checkpointing))


def probed_workload(workload: WorkloadSpec) -> WorkloadSpec:
    """The workload a probe runs: every sample at `seq_len` (the length range is the plan's)."""
    inputs = workload.inputs
    if isinstance(inputs, TokensInputs) and inputs.min_seq_len is not None:
        return workload.at_length(inputs.seq_len)
    return workload


def budget_lengths(request: PlanRequest) -> list[int]:
    """The lengths a token budget is probed at (empty unless lengths vary)."""
    inputs = request.workload.inputs
    if not isinstance(inputs, TokensInputs) or inputs.min_seq_len is None:
        return []
    return lengths_to_probe(inputs.min_seq_len, inputs.seq_len)


def extra_needs(request: PlanRequest) -> list[ProbeNeed]:
    """The probes beyond the train probes of each checkpointing choice: eval, then lengths."""
    needs: list[ProbeNeed] = []
    main = probed_workload(request.workload)
    if request.policy.eval:
        needs.append(ProbeNeed(main, False, "eval", "eval"))
    inputs = request.workload.inputs
    if isinstance(inputs, TokensInputs):
        for length in budget_lengths(request):
            if length == inputs.seq_len:
                continue  # the train probe itself
            for checkpointing in checkpointing_choices(request):
                needs.append(ProbeNeed(request.workload.at_length(length), checkpointing, "train", "length"))
    return needs


def all_needs(request: PlanRequest) -> list[ProbeNeed]:
    """Every probe the request needs, the train probes first."""
    main = probed_workload(request.workload)
    return [ProbeNeed(main, gc) for gc in checkpointing_choices(request)] + extra_needs(request)


@dataclass
class ExtraProbes:
    """The probes beyond the train probes that a plan uses (`tuner.planner.make_plan`)."""

    eval: ProbeResult | None = None
    lengths: dict[int, dict[bool, ProbeResult]] = field(default_factory=dict)
    """Token budget: seq_len → checkpointing → the train probe at that length."""

    def add(self, need: ProbeNeed, probe: ProbeResult) -> None:
        if need.role == "eval":
            self.eval = probe
        elif need.role == "length" and need.seq_len is not None:
            self.lengths.setdefault(need.seq_len, {})[need.gradient_checkpointing] = probe


def find_extras(
    request: PlanRequest, lookup: Callable[[ProbeNeed], ProbeResult | None]
) -> ExtraProbes | None:
    """The extra probes `lookup` finds for the request; None when one is missing."""
    extras = ExtraProbes()
    for need in extra_needs(request):
        probe = lookup(need)
        if probe is None:
            return None
        extras.add(need, probe)
    return extras
