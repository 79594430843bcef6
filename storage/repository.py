"""Repository functions: everything the API and the workers read and write, keyword-only.

Every function takes a `Session` first (or an `Engine`, on which it opens a short session). Reads
return domain types (`tuner.results.ProbeResult`, `tuner.results.Plan`) or frozen records
(`JobRecord`, `WaiterRecord`), never ORM rows. Writes are transactions of their own and commit
(`storage.db.write_transaction`). The job queue lives in `storage.jobs` and is re-exported here,
so that callers import from one place.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import selectinload

from storage.db import Bind, bound_session, write_transaction
from storage.jobs import (
    LEASE_EXPIRED_ERROR,
    add_waiter,
    claim_job,
    complete_job,
    enqueue_or_join,
    fail_job,
    fail_waiter,
    get_job,
    get_waiter,
    heartbeat,
    job_counts,
    list_jobs,
    list_waiters,
    new_worker_id,
    probe_cache_key,
    queue_depth,
    release_job,
    requeue_expired,
    resolve_waiter,
)
from storage.models import (
    PROBE_COMPLETE,
    WAITER_PENDING,
    WAITER_RESOLVED,
    JobWaiterRow,
    PlanRow,
    ProbeRow,
    TrialRow,
    utcnow,
)
from storage.records import Accepts, JobRecord, WaiterRecord
from tuner.errors import ConflictError, NotFoundError
from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, ModelSpec, PlanPolicy, WorkloadSpec

__all__ = [
    "LEASE_EXPIRED_ERROR",
    "Accepts",
    "JobRecord",
    "WaiterRecord",
    "add_waiter",
    "claim_job",
    "complete_job",
    "enqueue_or_join",
    "fail_job",
    "fail_waiter",
    "find_cached_probe",
    "get_job",
    "get_plan",
    "get_plan_request",
    "get_probe",
    "get_waiter",
    "heartbeat",
    "job_counts",
    "list_jobs",
    "list_plans",
    "list_waiters",
    "new_worker_id",
    "probe_cache_key",
    "queue_depth",
    "release_job",
    "requeue_expired",
    "resolve_waiter",
    "save_plan",
    "save_probe",
    "torch_minor",
]

UNKNOWN_TORCH = "unknown"
_MINOR = re.compile(r"^\s*(\d+)\.(\d+)")


def torch_minor(version: str | None) -> str:
    """The minor release of a torch version, part of the cache key: `2.13.1+cu126` → `2.13`."""
    match = _MINOR.match(version or "")
    return f"{match.group(1)}.{match.group(2)}" if match else UNKNOWN_TORCH


# ----------------------------------------------------------------------------------------- probes


def find_cached_probe(
    session: Bind,
    *,
    fingerprint: str,
    device_name: str,
    device_memory_bytes: int,
    backend: str,
    torch_minor: str,
    gradient_checkpointing: bool,
) -> ProbeResult | None:
    """The newest complete probe result for this cache key, with its trials; None on a miss."""
    query = (
        select(ProbeRow)
        .where(
            ProbeRow.fingerprint == fingerprint,
            ProbeRow.device_name == device_name,
            ProbeRow.device_memory_bytes == device_memory_bytes,
            ProbeRow.backend == backend,
            ProbeRow.torch_minor == torch_minor,
            ProbeRow.gradient_checkpointing == gradient_checkpointing,
            ProbeRow.status == PROBE_COMPLETE,
        )
        .order_by(ProbeRow.created_at.desc(), ProbeRow.id.desc())
        .limit(1)
    )
    with bound_session(session) as db:
        row = db.execute(_with_trials(query)).scalar_one_or_none()
        return None if row is None else _probe_from_row(row)


def save_probe(session: Bind, *, result: ProbeResult) -> int:
    """Store a probe result and every trial; returns its id (`result.id` is ignored)."""
    torch_version = result.versions.get("torch", "")
    row = ProbeRow(
        created_at=result.created_at or utcnow(),
        status=PROBE_COMPLETE,
        fingerprint=result.fingerprint,
        workload=result.workload.model_dump(mode="json"),
        device_name=result.device.name,
        device_memory_bytes=result.device.total_memory_bytes,
        backend=result.backend,
        torch_version=torch_version,
        torch_minor=torch_minor(torch_version),
        versions=dict(result.versions),
        gradient_checkpointing=result.gradient_checkpointing,
        max_batch_size=result.max_batch_size,
        stop_reason=result.stop_reason,
        strategy=result.strategy,
        memory_line=None
        if result.memory_line is None
        else {
            "fixed_bytes": result.memory_line.fixed_bytes,
            "per_sample_bytes": result.memory_line.per_sample_bytes,
        },
        capacity_bytes=result.capacity_bytes,
        facts=None if result.facts is None else result.facts.model_dump(mode="json"),
        extra=dict(result.extra),
        allocator_conf=result.allocator_conf,
        verified_steps=result.verified_steps,
        seconds=result.seconds,
        trials=[_trial_row(index, trial) for index, trial in enumerate(result.trials)],
    )
    with write_transaction(session) as db:
        db.add(row)
        db.flush()
        return row.id


def get_probe(session: Bind, *, probe_id: int) -> ProbeResult:
    """One probe result with every trial; `NotFoundError` when there is none with that id."""
    with bound_session(session) as db:
        row = db.execute(_with_trials(select(ProbeRow).where(ProbeRow.id == probe_id))).scalar_one_or_none()
        if row is None:
            raise NotFoundError(f"No probe result with id {probe_id}.")
        return _probe_from_row(row)


def _with_trials(query: Select[Any]) -> Select[Any]:
    # populate_existing: a long-lived session must not answer from its identity map.
    return query.options(selectinload(ProbeRow.trials)).execution_options(populate_existing=True)


def _trial_row(index: int, trial: Trial) -> TrialRow:
    return TrialRow(
        index=index,
        batch_size=trial.batch_size,
        ok=trial.ok,
        peak_allocated_bytes=trial.peak_allocated_bytes,
        peak_reserved_bytes=trial.peak_reserved_bytes,
        num_alloc_retries=trial.num_alloc_retries,
        seconds=trial.seconds,
        samples_per_second=trial.samples_per_second,
        peak_phase=trial.peak_phase,
        error=trial.error,
    )


def _probe_from_row(row: ProbeRow) -> ProbeResult:
    return ProbeResult(
        id=row.id,
        created_at=row.created_at,
        fingerprint=row.fingerprint,
        workload=_stored_workload(row.workload),
        device=DeviceSpec(name=row.device_name, total_memory_bytes=row.device_memory_bytes),
        backend=row.backend,
        gradient_checkpointing=row.gradient_checkpointing,
        max_batch_size=row.max_batch_size,
        strategy=row.strategy,
        stop_reason=row.stop_reason,
        trials=[
            Trial(
                batch_size=trial.batch_size,
                ok=trial.ok,
                peak_allocated_bytes=trial.peak_allocated_bytes,
                peak_reserved_bytes=trial.peak_reserved_bytes,
                seconds=trial.seconds,
                num_alloc_retries=trial.num_alloc_retries,
                samples_per_second=trial.samples_per_second,
                peak_phase=trial.peak_phase,
                error=trial.error,
            )
            for trial in row.trials
        ],
        memory_line=None if row.memory_line is None else MemoryLine(**row.memory_line),
        capacity_bytes=row.capacity_bytes,
        seconds=row.seconds,
        versions=row.versions,
        allocator_conf=row.allocator_conf,
        facts=None if row.facts is None else WorkloadFacts.model_validate(row.facts),
        verified_steps=row.verified_steps,
        extra=row.extra,
    )


def _stored_workload(data: dict[str, Any]) -> WorkloadSpec:
    """A stored workload as a spec. It validated when stored; a `python` factory whose package
    this process does not allow (settings differ between processes, or changed) is still read
    back, because refusing to build it is the job of whoever builds it, not of a read."""
    try:
        return WorkloadSpec.model_validate(data)
    except ValidationError:
        model = ModelSpec.model_construct(**data["model"])
        return WorkloadSpec.model_validate({**data, "model": model})


# ------------------------------------------------------------------------------------------ plans


def save_plan(
    session: Bind,
    *,
    plan: Plan,
    request: dict[str, Any] | BaseModel,
    waiter_id: int | None = None,
) -> int:
    """Store a plan and the request it answers; returns its id (`plan.id` is ignored).

    With `waiter_id`, the plan resolves that waiter in the same transaction. Resolving is
    idempotent: when the waiter was resolved already (two processes derived its plan), nothing is
    stored and the id of the plan it resolved to is returned. A failed waiter is a
    `ConflictError`; an unknown one a `NotFoundError`.
    """
    request_json = request.model_dump(mode="json") if isinstance(request, BaseModel) else dict(request)
    row = _plan_row(plan, request_json)
    with write_transaction(session) as db:
        if waiter_id is not None:
            waiter = db.execute(
                select(JobWaiterRow.status, JobWaiterRow.plan_id)
                .where(JobWaiterRow.id == waiter_id)
                .with_for_update()
            ).first()
            if waiter is None:
                raise NotFoundError(f"No job waiter with id {waiter_id}.")
            if waiter.status == WAITER_RESOLVED and waiter.plan_id is not None:
                return int(waiter.plan_id)
            if waiter.status != WAITER_PENDING:
                raise ConflictError(f"Job waiter {waiter_id} has {waiter.status}; it takes no plan.")
        db.add(row)
        db.flush()
        if waiter_id is not None:
            db.execute(
                update(JobWaiterRow)
                .where(JobWaiterRow.id == waiter_id)
                .values(status=WAITER_RESOLVED, plan_id=row.id, resolved_at=utcnow())
            )
        return row.id


def get_plan(session: Bind, *, plan_id: int) -> Plan:
    """One plan; `NotFoundError` when there is none with that id."""
    with bound_session(session) as db:
        row = db.execute(
            select(PlanRow).where(PlanRow.id == plan_id).execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if row is None:
            raise NotFoundError(f"No plan with id {plan_id}.")
        return _plan_from_row(row)


def get_plan_request(session: Bind, *, plan_id: int) -> dict[str, Any]:
    """The request a stored plan answered; `NotFoundError` when there is no such plan."""
    with bound_session(session) as db:
        request = db.execute(select(PlanRow.request).where(PlanRow.id == plan_id)).scalar_one_or_none()
        if request is None:
            raise NotFoundError(f"No plan with id {plan_id}.")
        return dict(request)


def list_plans(
    session: Bind,
    *,
    limit: int = 50,
    offset: int = 0,
    fingerprint: str | None = None,
    device_name: str | None = None,
    model: str | None = None,
    backend: str | None = None,
    family: str | None = None,
) -> tuple[list[Plan], int]:
    """Plans, newest first, matching every filter given; with the total number that match
    (for pagination). `model` is the workload's short name (`WorkloadSpec.describe()`)."""
    if limit < 1 or offset < 0:
        raise ValueError(f"limit must be positive and offset not negative, got {limit} and {offset}")
    filters = [
        column == value
        for column, value in (
            (PlanRow.fingerprint, fingerprint),
            (PlanRow.device_name, device_name),
            (PlanRow.model, model),
            (PlanRow.backend, backend),
            (PlanRow.family, family),
        )
        if value is not None
    ]
    page = (
        select(PlanRow)
        .where(*filters)
        .order_by(PlanRow.created_at.desc(), PlanRow.id.desc())
        .limit(limit)
        .offset(offset)
        .execution_options(populate_existing=True)
    )
    with bound_session(session) as db:
        total = int(db.execute(select(func.count()).select_from(PlanRow).where(*filters)).scalar_one())
        plans = [_plan_from_row(row) for row in db.execute(page).scalars()]
    return plans, total


def _plan_row(plan: Plan, request: dict[str, Any]) -> PlanRow:
    return PlanRow(
        created_at=plan.created_at or utcnow(),
        request=request,
        cache_hit=plan.cache_hit,
        fingerprint=plan.fingerprint,
        model=plan.workload.describe()[:200],
        family=plan.workload.model.family,
        workload=plan.workload.model_dump(mode="json"),
        device_name=plan.device.name,
        device_memory_bytes=plan.device.total_memory_bytes,
        backend=plan.backend,
        effective_batch_size=plan.effective_batch_size,
        world_size=plan.world_size,
        micro_batch_size=plan.micro_batch_size,
        accumulation_steps=plan.accumulation_steps,
        micro_batch_sizes=None if plan.micro_batch_sizes is None else list(plan.micro_batch_sizes),
        gradient_checkpointing=plan.gradient_checkpointing,
        max_micro_batch_size=dict(plan.max_micro_batch_size),
        memory_budget_bytes=plan.memory_budget_bytes,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        predicted_samples_per_second=plan.predicted_samples_per_second,
        probe_id=plan.probe_id,
        probe_ids=dict(plan.probe_ids),
        policy=plan.policy.model_dump(mode="json"),
        reason=plan.reason,
        warnings=list(plan.warnings),
        hints=list(plan.hints),
        accumulation_schedule=None
        if plan.accumulation_schedule is None
        else [dict(step) for step in plan.accumulation_schedule],
        versions=dict(plan.versions),
    )


def _plan_from_row(row: PlanRow) -> Plan:
    return Plan(
        id=row.id,
        created_at=row.created_at,
        cache_hit=row.cache_hit,
        fingerprint=row.fingerprint,
        workload=_stored_workload(row.workload),
        device=DeviceSpec(name=row.device_name, total_memory_bytes=row.device_memory_bytes),
        backend=row.backend,
        effective_batch_size=row.effective_batch_size,
        world_size=row.world_size,
        micro_batch_size=row.micro_batch_size,
        accumulation_steps=row.accumulation_steps,
        micro_batch_sizes=row.micro_batch_sizes,
        gradient_checkpointing=row.gradient_checkpointing,
        max_micro_batch_size=row.max_micro_batch_size,
        memory_budget_bytes=row.memory_budget_bytes,
        predicted_peak_bytes=row.predicted_peak_bytes,
        predicted_samples_per_second=row.predicted_samples_per_second,
        probe_id=row.probe_id,
        probe_ids=row.probe_ids,
        policy=PlanPolicy.model_validate(row.policy),
        reason=row.reason,
        warnings=row.warnings,
        hints=row.hints,
        accumulation_schedule=row.accumulation_schedule,
        versions=row.versions,
    )
