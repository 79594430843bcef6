"""The torch-free planning service that both the API and the workers use (docs/design.md).

A plan is derived from stored probes by the pure planner and stored with the identity of its
request and probes; the job a request waits on is keyed by the probes it needs. It lives in
`storage` because that is the lowest layer both `api` (which answers requests) and `probes` (whose
worker plans the requests waiting on its job) may import: it talks SQL through the repository and
plans with `tuner.planner`, and imports neither torch, the API nor the probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

from sqlalchemy.orm import Session

from storage import repository
from tuner.checkpointing import on_off
from tuner.job_payload import ExtraProbe, JobPayload
from tuner.plan_probes import (
    ExtraProbes,
    ProbeNeed,
    checkpointing_choices,
    extra_needs,
    find_extras,
    probed_workload,
)
from tuner.planner import make_plan
from tuner.probe_key import UNKNOWN_TORCH, ProbeKey, torch_minor
from tuner.results import Plan, ProbeResult
from tuner.spec import PlanRequest


def installed_torch_minor() -> str:
    """`2.13` for an installed torch 2.13.1+cu126, read from the package metadata (torch is never
    imported by the API); `unknown` where torch is not installed."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return UNKNOWN_TORCH
    return torch_minor(version)


def probe_keys(request: PlanRequest, torch_minor: str) -> dict[bool, ProbeKey] | None:
    """The cache key of each probe the request needs, by checkpointing choice; None when the
    request names no device (a cuda request for whichever GPU a worker has)."""
    if request.device is None:
        return None
    return {
        checkpointing: ProbeKey.of(
            request.workload,
            request.device,
            backend=request.backend,
            torch_minor=torch_minor,
            gradient_checkpointing=checkpointing,
            alloc_conf=request.alloc_conf,
            parallelism=request.parallel_setup().probe_key,
        )
        for checkpointing in checkpointing_choices(request)
    }


def extra_probe_key(request: PlanRequest, need: ProbeNeed, torch_minor: str) -> ProbeKey | None:
    """The cache key of one of the request's extra probes (`tuner.plan_probes`: the eval probe, a
    token budget's lengths); None when the request names no device."""
    if request.device is None:
        return None
    return ProbeKey.of(
        need.workload,
        request.device,
        backend=request.backend,
        torch_minor=torch_minor,
        gradient_checkpointing=need.gradient_checkpointing,
        alloc_conf=request.alloc_conf,
        step=need.step,
        parallelism=request.parallel_setup().probe_key,
    )


def canonical_request(request: PlanRequest) -> dict[str, Any]:
    """The request with every default filled in (but those of fields added later, at their default):
    what is stored with a plan and compared."""
    data: dict[str, Any] = request.model_dump(mode="json")
    # Fields added later are left out at their defaults, so that a request that does not use them
    # keeps the identity (and the stored plan) it had before they existed.
    if data.get("effective_tokens") is None:
        data.pop("effective_tokens", None)
    if data["policy"].get("eval") is False:
        data["policy"].pop("eval")
    if data["workload"]["inputs"].get("min_seq_len", 0) is None:
        data["workload"]["inputs"].pop("min_seq_len")
    return data


def cached_probes(
    session: Session, *, request: PlanRequest, torch_minor: str
) -> dict[bool, ProbeResult] | None:
    """The cached probe of every checkpointing choice the request needs, or None if one is missing
    (or the request names no device, so nothing can be looked up)."""
    keys = probe_keys(request, torch_minor)
    if keys is None:
        return None
    probes: dict[bool, ProbeResult] = {}
    for checkpointing, key in keys.items():
        probe = repository.find_cached_probe(session, key)
        if probe is None:
            return None
        probes[checkpointing] = probe
    return probes


def cached_extras(session: Session, *, request: PlanRequest, torch_minor: str) -> ExtraProbes | None:
    """The cached eval probe and token-budget lengths the request needs (`tuner.plan_probes`), or
    None if one is missing (or the request names no device)."""
    if request.device is None:
        return None

    def lookup(need: ProbeNeed) -> ProbeResult | None:
        key = extra_probe_key(request, need, torch_minor)
        return None if key is None else repository.find_cached_probe(session, key)

    return find_extras(request, lookup)


def extra_probe_ids(extras: ExtraProbes) -> dict[str, int]:
    """The extra probes' ids, keyed as a plan's identity names them: `eval`, `length:64:off`."""
    ids: dict[str, int] = {}
    if extras.eval is not None and extras.eval.id is not None:
        ids["eval"] = extras.eval.id
    for length, by_choice in sorted(extras.lengths.items()):
        for checkpointing, probe in sorted(by_choice.items()):
            if probe.id is not None:
                ids[f"length:{length}:{on_off(checkpointing)}"] = probe.id
    return ids


def derive_plan(
    session: Session,
    *,
    request: PlanRequest,
    torch_minor: str,
    cache_hit: bool = True,
    waiter_id: int | None = None,
    hints: Sequence[str] = (),
) -> Plan | None:
    """The plan for `request` from cached probes, or None when a probe it needs is not cached.

    The plan stored for the same request and probes (`repository.find_plan_by_request`) is
    returned with `cache_hit` true; otherwise `make_plan` derives a new one, which is saved (and
    committed) with `cache_hit` as given: true when no probe ran for this request, false when a
    worker derives the plan of a request that waited on its probe. Saving is insert-or-return-
    existing: when another process stored the same plan meanwhile, that one is returned (with
    `cache_hit` true) and no second row is made. With `waiter_id`, that waiter is resolved to the
    plan (the new one or the stored one), so that every waiter of a job with the same request
    gets the same plan. `hints` are added to a new plan (what the worker learnt while probing).
    Torch-free: the worker calls it too. The request must name
    its device (a worker fills in its own for a device-less cuda request).
    Raises the planner's `PlanError`/`NothingFitsError` when the probes allow no plan.
    """
    probes = cached_probes(session, request=request, torch_minor=torch_minor)
    if probes is None:
        return None
    extras = cached_extras(session, request=request, torch_minor=torch_minor)
    if extras is None:
        return None
    canonical = canonical_request(request)
    probe_ids = {on_off(gc): probe.id for gc, probe in probes.items() if probe.id is not None}
    probe_ids.update(extra_probe_ids(extras))
    earlier = repository.find_plan_by_request(
        session, request_hash=repository.plan_request_hash(canonical, probe_ids)
    )
    if earlier is not None and earlier.id is not None:
        if waiter_id is not None:
            repository.resolve_waiter(session, waiter_id=waiter_id, plan_id=earlier.id)
        return earlier.model_copy(update={"cache_hit": True})
    plan = make_plan(request, probes, extras)
    plan = plan.model_copy(update={"cache_hit": cache_hit, "hints": [*plan.hints, *hints]})
    plan_id, created = repository.save_plan_or_existing(
        session, plan=plan, request=canonical, waiter_id=waiter_id
    )
    stored = repository.get_plan(session, plan_id=plan_id)
    return stored if created else stored.model_copy(update={"cache_hit": True})


def job_key(request: PlanRequest, torch_minor: str) -> str:
    """One job per probe cache key and set of checkpointing choices; `*` stands for any device."""
    device = request.device
    parts = [
        request.workload.fingerprint(),
        device.name if device else "*",
        str(device.total_memory_bytes) if device else "*",
        request.backend,
        torch_minor,
        ",".join(on_off(gc) for gc in checkpointing_choices(request)),
        request.alloc_conf or "",
        request.parallel_setup().probe_key,
    ]
    extras = extra_needs(request)
    if extras:  # absent otherwise, so that the keys of jobs without extra probes stay as they were
        parts.append(
            ",".join(
                f"{need.step}:{need.seq_len or ''}:{int(need.gradient_checkpointing)}" for need in extras
            )
        )
    return "|".join(parts)


def job_payload(request: PlanRequest, torch_minor: str) -> JobPayload:
    """What the worker reads (`tuner.job_payload`): the workload, device, backend, checkpointing
    choices, torch minor and allocator setting; with `extra_probes`, the eval probe and a token
    budget's lengths, which the worker probes after the train probes. The job's row stores
    `job_payload(...).stored()`."""
    return JobPayload(
        workload=probed_workload(request.workload),
        device=request.device,
        backend=request.backend,
        gradient_checkpointing=tuple(checkpointing_choices(request)),
        torch_minor=torch_minor,
        alloc_conf=request.alloc_conf,
        parallel=request.parallel_setup(),
        extra_probes=tuple(
            ExtraProbe(
                workload=need.workload,
                gradient_checkpointing=need.gradient_checkpointing,
                step=need.step,
                role=need.role,
            )
            for need in extra_needs(request)
        ),
    )
