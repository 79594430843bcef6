"""Repository functions: everything the API and the workers read and write, keyword-only.

Every function takes a `Session` first (or an `Engine`, on which it opens a short session). Reads
return domain types (`tuner.results.ProbeResult`, `tuner.results.Plan`) or frozen records
(`JobRecord`, `WaiterRecord`), never ORM rows. Writes are transactions of their own and commit
(`storage.db.write_transaction`). The job queue lives in `storage.jobs` and the live workers in
`storage.workers`; both are re-exported here, so that callers import from one place.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Select, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from storage.db import Bind, bound_session, dialect_insert, write_transaction
from storage.identity import plan_request_hash
from storage.jobs import (
    LEASE_EXPIRED_ERROR,
    add_waiter,
    claim_job,
    complete_job,
    enqueue_or_join,
    enqueue_waiters,
    fail_job,
    fail_waiter,
    fail_waiters,
    finished_jobs,
    get_job,
    get_waiter,
    heartbeat,
    job_counts,
    list_jobs,
    list_waiters,
    queue_depth,
    release_job,
    requeue_expired,
    resolve_waiter,
    resolve_waiters,
)
from storage.models import (
    DEFAULT_ALLOC_CONF,
    PROBE_COMPLETE,
    PROBE_KEY_COLUMNS,
    JobWaiterRow,
    PlanRow,
    ProbeRow,
    TrialRow,
    utcnow,
)
from storage.records import Accepts, JobRecord, WaiterRecord
from storage.workers import WorkerRecord, announce_worker, live_workers, retire_worker
from tuner.errors import ConflictError, NotFoundError
from tuner.job_status import WAITER_PENDING, WAITER_RESOLVED
from tuner.parallelism import ParallelismSpec, default_parallelism
from tuner.probe_key import UNKNOWN_TORCH, ProbeKey, torch_minor
from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, ModelSpec, PlanPolicy, WorkloadSpec

__all__ = [
    "LEASE_EXPIRED_ERROR",
    "UNKNOWN_TORCH",
    "Accepts",
    "JobRecord",
    "ProbeKey",
    "WaiterRecord",
    "WorkerRecord",
    "add_waiter",
    "announce_worker",
    "claim_job",
    "complete_job",
    "enqueue_or_join",
    "enqueue_waiters",
    "fail_job",
    "fail_waiter",
    "fail_waiters",
    "find_cached_probe",
    "find_plan_by_request",
    "finished_jobs",
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
    "live_workers",
    "plan_request_hash",
    "queue_depth",
    "release_job",
    "requeue_expired",
    "resolve_waiter",
    "resolve_waiters",
    "retire_worker",
    "save_plan",
    "save_plan_or_existing",
    "save_probe",
    "save_probe_or_existing",
    "torch_minor",
]


def _unstorable(*texts: str | None) -> bool:
    """True when a text cannot be in any row: PostgreSQL text holds no NUL character (and refuses
    a query that compares with one), so a lookup by such a value matches nothing on either
    database, and is answered without asking."""
    return any(text is not None and "\x00" in text for text in texts)


# ----------------------------------------------------------------------------------------- probes


def find_cached_probe(session: Bind, key: ProbeKey) -> ProbeResult | None:
    """The complete probe result for this cache key, with its trials; None on a miss. (The key is
    unique among complete results; superseded ones, kept by migrations 0002 and 0003, are never
    returned.) `key.parallelism` is the data-parallel job's probe key
    (`tuner.parallelism.ParallelSetup.probe_key`; '' for a single process)."""
    if _unstorable(*key.texts()):
        return None
    query = (
        select(ProbeRow)
        .where(
            ProbeRow.fingerprint == key.fingerprint,
            ProbeRow.device_name == key.device_name,
            ProbeRow.device_memory_bytes == key.device_memory_bytes,
            ProbeRow.backend == key.backend,
            ProbeRow.torch_minor == key.torch_minor,
            ProbeRow.gradient_checkpointing == key.gradient_checkpointing,
            ProbeRow.alloc_conf == (key.alloc_conf or DEFAULT_ALLOC_CONF),
            ProbeRow.step == key.step,
            ProbeRow.parallelism == key.parallelism,
            ProbeRow.status == PROBE_COMPLETE,
        )
        .order_by(ProbeRow.created_at.desc(), ProbeRow.id.desc())
        .limit(1)
    )
    with bound_session(session) as db:
        row = db.execute(_with_trials(query)).scalar_one_or_none()
        return None if row is None else _probe_from_row(row)


def save_probe(session: Bind, *, result: ProbeResult) -> int:
    """Store a probe result and every trial, or find the one already stored for its cache key;
    returns the id of the stored result (`result.id` is ignored). See `save_probe_or_existing`."""
    probe_id, _created = save_probe_or_existing(session, result=result)
    return probe_id


def save_probe_or_existing(session: Bind, *, result: ProbeResult) -> tuple[int, bool]:
    """Store a probe result and every trial unless a complete result with the same cache key
    (fingerprint, device name and memory, backend, torch minor, checkpointing) is stored already.

    Returns `(id, created)`: the new row's id and True, or the existing row's id and False (the
    first stored result wins; the caller compares them when that matters). Atomic on both
    databases: the insert is `INSERT … ON CONFLICT DO NOTHING` against the unique cache-key index,
    so of any number of racing callers exactly one creates the row and every other one gets its id.
    """
    values = _probe_values(result)
    with write_transaction(session) as db:
        probe_id = _insert_unless_present(db, dialect_insert(db, ProbeRow).values(**values))
        if probe_id is None:
            existing = db.execute(
                select(ProbeRow.id).where(
                    *(getattr(ProbeRow, column) == values[column] for column in PROBE_KEY_COLUMNS),
                    ProbeRow.status == PROBE_COMPLETE,
                )
            ).scalar_one()
            return int(existing), False
        if result.trials:
            db.execute(
                insert(TrialRow),
                [_trial_values(probe_id, index, trial) for index, trial in enumerate(result.trials)],
            )
        return probe_id, True


def _insert_unless_present(db: Session, statement: postgresql.Insert | sqlite.Insert) -> int | None:
    """Run `statement` with `ON CONFLICT DO NOTHING … RETURNING id`: the new row's id, or None
    when a unique index already holds an equal row. On PostgreSQL a conflicting row of a
    transaction still in flight makes this wait for it: committed, this returns None (and a
    following read sees that row); rolled back, this inserts."""
    inserted = db.execute(statement.on_conflict_do_nothing().returning(statement.table.c.id))
    new_id = inserted.scalar_one_or_none()
    return None if new_id is None else int(new_id)


def _probe_values(result: ProbeResult) -> dict[str, Any]:
    torch_version = result.versions.get("torch", "")
    return {
        "created_at": result.created_at or utcnow(),
        "status": PROBE_COMPLETE,
        "fingerprint": result.fingerprint,
        "workload": result.workload.model_dump(mode="json"),
        "device_name": result.device.name,
        "device_memory_bytes": result.device.total_memory_bytes,
        "backend": result.backend,
        "torch_version": torch_version,
        "torch_minor": torch_minor(torch_version),
        "versions": dict(result.versions),
        "gradient_checkpointing": result.gradient_checkpointing,
        "max_batch_size": result.max_batch_size,
        "stop_reason": result.stop_reason,
        "strategy": result.strategy,
        "memory_line": None
        if result.memory_line is None
        else {
            "fixed_bytes": result.memory_line.fixed_bytes,
            "per_sample_bytes": result.memory_line.per_sample_bytes,
        },
        "capacity_bytes": result.capacity_bytes,
        "facts": None if result.facts is None else result.facts.model_dump(mode="json"),
        "extra": dict(result.extra),
        "alloc_conf": result.alloc_conf or DEFAULT_ALLOC_CONF,
        "step": result.step,
        "parallelism": result.parallelism,
        "verified_steps": result.verified_steps,
        "seconds": result.seconds,
    }


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


def _trial_values(probe_id: int, index: int, trial: Trial) -> dict[str, Any]:
    return {
        "probe_id": probe_id,
        "index": index,
        "batch_size": trial.batch_size,
        "ok": trial.ok,
        "peak_allocated_bytes": trial.peak_allocated_bytes,
        "peak_reserved_bytes": trial.peak_reserved_bytes,
        "num_alloc_retries": trial.num_alloc_retries,
        "seconds": trial.seconds,
        "samples_per_second": trial.samples_per_second,
        "step_seconds": trial.step_seconds,
        "move": trial.move,
        "peak_phase": trial.peak_phase,
        "error": trial.error,
    }


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
                step_seconds=trial.step_seconds,
                move=trial.move,
                peak_phase=trial.peak_phase,
                error=trial.error,
            )
            for trial in row.trials
        ],
        memory_line=None if row.memory_line is None else MemoryLine(**row.memory_line),
        capacity_bytes=row.capacity_bytes,
        seconds=row.seconds,
        versions=row.versions,
        alloc_conf=row.alloc_conf or None,
        step=row.step if row.step in ("train", "eval") else "train",
        parallelism=row.parallelism or "",
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
    """Store a plan and the request it answers, or find the identical plan stored already;
    returns the stored plan's id (`plan.id` is ignored). See `save_plan_or_existing`."""
    plan_id, _created = save_plan_or_existing(session, plan=plan, request=request, waiter_id=waiter_id)
    return plan_id


def save_plan_or_existing(
    session: Bind,
    *,
    plan: Plan,
    request: dict[str, Any] | BaseModel,
    waiter_id: int | None = None,
) -> tuple[int, bool]:
    """Store a plan and the request it answers unless the plan of the same identity
    (`plan_request_hash(request, plan.probe_ids)`) is stored already.

    Returns `(id, created)`: the new plan's id and True, or the stored plan's id and False. Atomic
    on both databases (`INSERT … ON CONFLICT DO NOTHING` on the unique `request_hash`): of any
    number of API replicas or workers storing the same plan at once, one creates the row and every
    other gets its id.

    With `waiter_id`, the plan (new or found) resolves that waiter in the same transaction.
    Resolving is idempotent: when the waiter was resolved already (two processes derived its
    plan), nothing is stored and the id of the plan it resolved to is returned, with False. A
    failed waiter is a `ConflictError`; an unknown one a `NotFoundError`.
    """
    request_json = request.model_dump(mode="json") if isinstance(request, BaseModel) else dict(request)
    values = _plan_values(plan, request_json)
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
                return int(waiter.plan_id), False
            if waiter.status != WAITER_PENDING:
                raise ConflictError(f"Job waiter {waiter_id} has {waiter.status}; it takes no plan.")
        plan_id = _insert_unless_present(db, dialect_insert(db, PlanRow).values(**values))
        created = plan_id is not None
        if plan_id is None:
            plan_id = int(
                db.execute(
                    select(PlanRow.id).where(PlanRow.request_hash == values["request_hash"])
                ).scalar_one()
            )
        if waiter_id is not None:
            db.execute(
                update(JobWaiterRow)
                .where(JobWaiterRow.id == waiter_id)
                .values(status=WAITER_RESOLVED, plan_id=plan_id, resolved_at=utcnow())
            )
        return plan_id, created


def find_plan_by_request(session: Bind, *, request_hash: str) -> Plan | None:
    """The stored plan of this identity (`plan_request_hash(request, probe_ids)`); None if none."""
    with bound_session(session) as db:
        row = db.execute(
            select(PlanRow)
            .where(PlanRow.request_hash == request_hash)
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()
        return None if row is None else _plan_from_row(row)


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
    if _unstorable(fingerprint, device_name, model, backend, family):
        return [], 0
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


def _plan_values(plan: Plan, request: dict[str, Any]) -> dict[str, Any]:
    return dict(
        created_at=plan.created_at or utcnow(),
        request=request,
        request_hash=plan_request_hash(request, plan.probe_ids),
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
        eval_and_tokens=_eval_and_tokens(plan),
        memory_per_rank=None if plan.memory_per_rank is None else dict(plan.memory_per_rank),
    )


EVAL_AND_TOKEN_FIELDS = (
    "eval_micro_batch_size",
    "eval_predicted_peak_bytes",
    "eval_probe_id",
    "max_tokens_per_micro_batch",
    "token_budget",
)
"""The plan fields stored in `plans.eval_and_tokens` (None where a plan has none of them)."""


def _eval_and_tokens(plan: Plan) -> dict[str, Any] | None:
    values = plan.model_dump(mode="json", include=set(EVAL_AND_TOKEN_FIELDS))
    return values if any(value is not None for value in values.values()) else None


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
        alloc_conf=(row.request or {}).get("alloc_conf"),
        **(row.eval_and_tokens or {}),
        parallelism=_stored_parallelism(row.request),
        memory_per_rank=row.memory_per_rank,
    )


def _stored_parallelism(request: dict[str, Any] | None) -> ParallelismSpec:
    """The parallelism of a stored plan's request (a plan stored before there was one: a single
    process, or DDP at more than one rank, which is what such a request now means)."""
    data = request or {}
    if data.get("parallelism"):
        return ParallelismSpec.model_validate(data["parallelism"])
    return default_parallelism(int(data.get("world_size") or 1))
