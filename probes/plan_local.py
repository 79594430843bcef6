"""Every probe a plan request needs, run here one after the other (`tuner plan --local`,
`tuner.plan_for` without a server): the train probe of each checkpointing choice, then the eval
probe and the token budget's lengths (`tuner.plan_probes`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from tuner.plan_probes import ExtraProbes, ProbeNeed, all_needs
from tuner.results import ProbeResult
from tuner.search_types import Trial
from tuner.spec import PlanRequest

ProgressFor = Callable[[ProbeNeed], AbstractContextManager[Any]]
"""A context per probe that yields an object with `advance(trial)` and `done(result)`."""


class _Silent:
    def advance(self, _trial: Trial) -> None:
        pass

    def done(self, _result: ProbeResult) -> None:
        pass


@contextmanager
def _silent(_need: ProbeNeed) -> Iterator[_Silent]:
    yield _Silent()


def run_plan_probes(
    request: PlanRequest,
    *,
    progress_for: ProgressFor | None = None,
    max_trials: int = 32,
    search_within_cap: bool = True,
) -> tuple[dict[bool, ProbeResult], ExtraProbes]:
    """The train probe of each checkpointing choice, and the extra probes, for `request`.
    `search_within_cap`: the train probes search no further than the policy's
    `max_micro_batch_size` (no plan can use more); off, the probe's answer says how much room
    there is beyond it (`tuner.plan_for`)."""
    from probes.probe import run_probe

    probes: dict[bool, ProbeResult] = {}
    extras = ExtraProbes()
    for need in all_needs(request):
        with (progress_for or _silent)(need) as bar:
            result = run_probe(
                need.workload,
                backend=request.backend,
                device=request.device,
                gradient_checkpointing=need.gradient_checkpointing,
                # No plan can use more than the caller's cap: searching beyond it is wasted (the
                # eval batch and a token budget's short lengths are not bound by it).
                max_batch_size=(
                    request.policy.max_micro_batch_size
                    if need.role == "train" and search_within_cap
                    else None
                )
                or 65536,
                max_trials=max_trials,
                progress=bar.advance,
                alloc_conf=request.alloc_conf,
                step=need.step,
                # The plan's allocator hint comes from its train probes at seq_len.
                allocator_hint=need.role == "train",
            )
            bar.done(result)
        if need.role == "train":
            probes[need.gradient_checkpointing] = result
        else:
            extras.add(need, result)
    return probes, extras
