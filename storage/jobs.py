"""The probe job queue on SQL: enqueue-or-join, claim with a lease, heartbeat, complete, fail with
retry and backoff, release, requeue of stalled jobs, and the plan requests waiting on a job.

The design is procrastinate's: a claim is one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP
LOCKED LIMIT 1) RETURNING …`, so that the status change and the lock are one statement and
concurrent workers never wait on each other's rows. SQLite has no row locks (and ignores
`FOR UPDATE`); there the same statement runs inside `BEGIN IMMEDIATE`, which serializes writers.
Every write function is a transaction of its own and commits (`storage.db.write_transaction`).

The transactions that end a job (`complete_job`, a final `fail_job`, `requeue_expired` of a last
attempt) signal it to waiters (`storage.job_events`): a PostgreSQL `NOTIFY` delivered at their
commit, and this process's subscribers after it.

Times come from the calling process's clock (UTC): leases are tens of seconds, and the nodes of a
fleet are expected to keep their clocks in sync (NTP).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Select, Table, and_, case, false, func, or_, select, text, true, update
from sqlalchemy.orm import Session

from storage.db import Bind, bound_session, dialect_insert, write_transaction
from storage.job_events import notify_finished, publish_finished
from storage.models import JobRow, JobWaiterRow, utcnow
from storage.records import Accepts, JobRecord, WaiterRecord
from tuner.errors import ConflictError, NotFoundError
from tuner.job_status import (
    ACTIVE_JOB_STATUSES,
    FINISHED_JOB_STATUSES,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_STATUSES,
    JOB_SUCCEEDED,
    WAITER_FAILED,
    WAITER_PENDING,
    WAITER_RESOLVED,
    sql_in,
)

JOBS = cast(Table, JobRow.__table__)
WAITERS = cast(Table, JobWaiterRow.__table__)

LEASE_EXPIRED_ERROR = "The worker running this job stopped heart-beating and its lease expired."
_ACTIVE_KEY_PREDICATE = text(sql_in(ACTIVE_JOB_STATUSES))
_ENQUEUE_TRIES = 10


# ---------------------------------------------------------------------------------------- enqueue


def enqueue_waiters(
    session: Bind,
    *,
    key: str,
    payload: dict[str, Any],
    max_attempts: int,
    requests: Sequence[dict[str, Any]],
    backend: str | None = None,
    device_name: str | None = None,
    device_memory_bytes: int | None = None,
) -> tuple[JobRecord, bool, list[int]]:
    """`enqueue_or_join` with many waiting plan requests stored in its one transaction: `(job,
    created, waiter_ids)`, the ids in the order of `requests`. The API stores the requests of a
    herd that arrived together this way (one transaction, not one per request), and keeps each
    waiter's id to resolve it itself if the job's worker did not (a waiter that joined after the
    worker had read the job's waiters)."""
    return _enqueue_or_join(
        session,
        key=key,
        payload=payload,
        max_attempts=max_attempts,
        backend=backend,
        device_name=device_name,
        device_memory_bytes=device_memory_bytes,
        waiters=list(requests),
    )


def enqueue_or_join(
    session: Bind,
    *,
    key: str,
    payload: dict[str, Any],
    max_attempts: int,
    backend: str | None = None,
    device_name: str | None = None,
    device_memory_bytes: int | None = None,
    waiter: dict[str, Any] | None = None,
) -> tuple[JobRecord, bool]:
    """The active (queued or running) job for `key`, created when there is none.

    Returns the job and whether this call created it. However many callers race, one job per key
    is active: a partial unique index on `key` (status queued or running) decides, through
    `INSERT … ON CONFLICT DO NOTHING`, and the losers read the winner's job.

    `backend`, `device_name` and `device_memory_bytes` say which workers may claim the job; when
    omitted they are read from a payload shaped like a plan request (`payload["backend"]`,
    `payload["device"]["name"]`, `payload["device"]["total_memory_bytes"]`).

    `waiter`, when given, is a plan request stored on the job in the same transaction (see
    `add_waiter`): joining a job and waiting on it cannot miss the job's completion.
    """
    job, created, _waiter_ids = _enqueue_or_join(
        session,
        key=key,
        payload=payload,
        max_attempts=max_attempts,
        backend=backend,
        device_name=device_name,
        device_memory_bytes=device_memory_bytes,
        waiters=[] if waiter is None else [waiter],
    )
    return job, created


def _enqueue_or_join(
    session: Bind,
    *,
    key: str,
    payload: dict[str, Any],
    max_attempts: int,
    backend: str | None,
    device_name: str | None,
    device_memory_bytes: int | None,
    waiters: list[dict[str, Any]],
) -> tuple[JobRecord, bool, list[int]]:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    device = payload.get("device")
    if not isinstance(device, dict):
        device = {}
    backend = backend or payload.get("backend")
    if not isinstance(backend, str) or not backend:
        raise ValueError("enqueue_or_join needs a backend (argument or payload['backend'])")
    device_name = device_name if device_name is not None else device.get("name")
    if device_memory_bytes is None:
        device_memory_bytes = device.get("total_memory_bytes")

    with write_transaction(session) as db:
        now = utcnow()
        values = {
            "key": key,
            "payload": payload,
            "backend": backend,
            "device_name": device_name,
            "device_memory_bytes": device_memory_bytes,
            "status": JOB_QUEUED,
            "attempts": 0,
            "max_attempts": max_attempts,
            "run_after": now,
            "created_at": now,
            "updated_at": now,
        }
        insert = dialect_insert(db, JOBS)
        statement = (
            insert.values(**values)
            .on_conflict_do_nothing(index_elements=["key"], index_where=_ACTIVE_KEY_PREDICATE)
            .returning(*JOBS.c)
        )
        for _ in range(_ENQUEUE_TRIES):
            created = db.execute(statement).mappings().first()
            if created is not None:
                job, was_created = JobRecord.from_row(created), True
                break
            # FOR SHARE (PostgreSQL): the job cannot finish until this transaction, and the
            # waiter it adds, are committed. Under READ COMMITTED a job that finished meanwhile
            # no longer matches, and the insert is tried again.
            existing = db.execute(_active_job(key).with_for_update(read=True)).mappings().first()
            if existing is not None:
                job, was_created = JobRecord.from_row(existing), False
                break
        else:
            raise ConflictError(f"Could not enqueue or join the job for key {key!r}: it kept changing.")
        return job, was_created, _insert_waiters(db, job_id=job.id, requests=waiters)


def _active_job(key: str) -> Select[Any]:
    return select(JOBS).where(JOBS.c.key == key, JOBS.c.status.in_(ACTIVE_JOB_STATUSES))


def add_waiter(session: Bind, *, job_id: int, request: dict[str, Any]) -> int:
    """Store a plan request to derive when the job finishes; returns the waiter's id.

    Raises `NotFoundError` for an unknown job and `ConflictError` when the job is no longer
    queued or running (its waiters have been handed over already: read the cache instead).
    """
    with write_transaction(session) as db:
        row = db.execute(select(JOBS.c.status).where(JOBS.c.id == job_id).with_for_update(read=True)).first()
        if row is None:
            raise NotFoundError(f"No job with id {job_id}.")
        if row.status not in ACTIVE_JOB_STATUSES:
            raise ConflictError(f"Job {job_id} has already {row.status}; it takes no more waiters.")
        return _insert_waiter(db, job_id=job_id, request=request)


def _insert_waiter(db: Session, *, job_id: int, request: dict[str, Any]) -> int:
    return _insert_waiters(db, job_id=job_id, requests=[request])[0]


def _insert_waiters(db: Session, *, job_id: int, requests: list[dict[str, Any]]) -> list[int]:
    """One INSERT for all the rows (SQLAlchemy batches them); the ids in the requests' order."""
    if not requests:
        return []
    now = utcnow()
    rows = [
        {"job_id": job_id, "request": request, "status": WAITER_PENDING, "created_at": now}
        for request in requests
    ]
    ids = db.execute(WAITERS.insert().returning(WAITERS.c.id, sort_by_parameter_order=True), rows).scalars()
    return [int(waiter_id) for waiter_id in ids]


# ------------------------------------------------------------------------------------------ claim


def claim_job(
    session: Bind,
    *,
    worker_id: str,
    lease_seconds: float,
    accepts: Accepts | Sequence[Accepts] | None = None,
    requeue_stalled: bool = True,
) -> JobRecord | None:
    """Claim the oldest due queued job this worker accepts, or None when there is none.

    The job becomes `running` under `worker_id` with a lease of `lease_seconds`, and its
    `attempts` grows by one. `accepts` filters by backend and device (several filters: any may
    match; None: every job). With `requeue_stalled`, jobs whose lease expired are first put back
    in the queue (`requeue_expired`), so a fleet heals without a separate janitor.
    """
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
    if requeue_stalled:
        requeue_expired(session)
    with write_transaction(session) as db:
        now = utcnow()
        candidate = (
            select(JOBS.c.id)
            .where(JOBS.c.status == JOB_QUEUED, JOBS.c.run_after <= now, _accepts_clause(accepts))
            .order_by(JOBS.c.run_after, JOBS.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        claimed = (
            db.execute(
                update(JOBS)
                .where(JOBS.c.id == candidate)
                .values(
                    status=JOB_RUNNING,
                    attempts=JOBS.c.attempts + 1,
                    worker_id=worker_id,
                    lease_until=now + timedelta(seconds=lease_seconds),
                    heartbeat_at=now,
                    started_at=now,
                    updated_at=now,
                )
                .returning(*JOBS.c)
            )
            .mappings()
            .first()
        )
        return None if claimed is None else JobRecord.from_row(claimed)


def _accepts_clause(accepts: Accepts | Sequence[Accepts] | None) -> Any:
    if accepts is None:
        return true()
    filters = [accepts] if isinstance(accepts, Accepts) else list(accepts)
    if not filters:
        return false()
    alternatives = []
    for accept in filters:
        conditions: list[Any] = []
        if accept.backend is not None:
            conditions.append(JOBS.c.backend == accept.backend)
        if accept.device_name is not None:
            conditions.append(or_(JOBS.c.device_name.is_(None), JOBS.c.device_name == accept.device_name))
        if accept.device_memory_bytes is not None:
            conditions.append(
                or_(
                    JOBS.c.device_memory_bytes.is_(None),
                    JOBS.c.device_memory_bytes == accept.device_memory_bytes,
                )
            )
        alternatives.append(and_(true(), *conditions))
    return or_(*alternatives)


# ------------------------------------------------------------------------------ while it runs


def heartbeat(
    session: Bind,
    *,
    job_id: int,
    worker_id: str,
    lease_seconds: float,
    progress: dict[str, Any] | None = None,
) -> bool:
    """Renew the lease (and store `progress` when given). False when the lease was lost: the job
    was requeued or finished, and the worker should stop working on it."""
    with write_transaction(session) as db:
        now = utcnow()
        values: dict[str, Any] = {
            "lease_until": now + timedelta(seconds=lease_seconds),
            "heartbeat_at": now,
            "updated_at": now,
        }
        if progress is not None:
            values["progress"] = progress
        result = db.execute(update(JOBS).where(*_held_by(job_id, worker_id)).values(**values))
        return _rowcount(result) == 1


def complete_job(session: Bind, *, job_id: int, worker_id: str, probe_id: int) -> bool:
    """Mark the job `succeeded` with the probe result it stored, and signal its end to waiters
    (`storage.job_events`). False when the lease was lost (the probe result is stored all the
    same, and serves the cache)."""
    with write_transaction(session) as db:
        now = utcnow()
        result = db.execute(
            update(JOBS)
            .where(*_held_by(job_id, worker_id))
            .values(
                status=JOB_SUCCEEDED,
                probe_id=probe_id,
                error=None,
                error_code=None,
                lease_until=None,
                finished_at=now,
                updated_at=now,
            )
        )
        completed = _rowcount(result) == 1
        if completed:
            notify_finished(db, [job_id])
    if completed:
        publish_finished([job_id])
    return completed


def fail_job(
    session: Bind,
    *,
    job_id: int,
    worker_id: str,
    error: str,
    error_code: str | None = None,
    retry_backoff_seconds: float,
    retry: bool = True,
) -> JobRecord | None:
    """Record a failed attempt. While attempts remain (and `retry`), the job goes back to the
    queue, due after `retry_backoff_seconds × 2^(attempts − 1)`; otherwise it ends `failed` with
    `error`, its pending waiters fail with it, and its end is signalled to waiters. Returns the
    job as updated, or None when the lease was lost. Pass `retry=False` for errors that another
    attempt cannot fix (a spec that does not build), with their `error_code`
    (`tuner.errors.CLIENT_FAULT_CODES`); a failure of the service has none."""
    with write_transaction(session) as db:
        held = select(JOBS).where(*_held_by(job_id, worker_id)).with_for_update()
        row = db.execute(held).mappings().first()
        if row is None:
            return None
        now = utcnow()
        attempts = int(row["attempts"])
        final = not retry or attempts >= int(row["max_attempts"])
        values: dict[str, Any] = {
            "error": error,
            "error_code": error_code,
            "worker_id": None,
            "lease_until": None,
            "updated_at": now,
        }
        if final:
            values.update(status=JOB_FAILED, finished_at=now)
        else:
            backoff = retry_backoff_seconds * 2 ** max(0, attempts - 1)
            values.update(status=JOB_QUEUED, run_after=now + timedelta(seconds=backoff))
        updated = (
            db.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values).returning(*JOBS.c))
            .mappings()
            .one()
        )
        if final:
            _fail_waiters(db, job_ids=[job_id], error=error, error_code=error_code)
            notify_finished(db, [job_id])
    if final:
        publish_finished([job_id])
    return JobRecord.from_row(updated)


def release_job(session: Bind, *, job_id: int, worker_id: str) -> bool:
    """Give the job back to the queue without counting the attempt (a worker shutting down on
    SIGTERM). False when the lease was lost already."""
    with write_transaction(session) as db:
        now = utcnow()
        result = db.execute(
            update(JOBS)
            .where(*_held_by(job_id, worker_id))
            .values(
                status=JOB_QUEUED,
                attempts=case((JOBS.c.attempts > 0, JOBS.c.attempts - 1), else_=0),
                worker_id=None,
                lease_until=None,
                run_after=now,
                updated_at=now,
            )
        )
        return _rowcount(result) == 1


def requeue_expired(session: Bind, *, now: datetime | None = None) -> int:
    """Put running jobs whose lease expired before `now` back in the queue, or end them `failed`
    when they had their last attempt (their waiters fail too, and their end is signalled).
    Returns how many jobs it touched.

    Safe to run from every worker at once: the update re-checks the expiry under the row lock.
    """
    with write_transaction(session) as db:
        now = now or utcnow()
        exhausted = JOBS.c.attempts >= JOBS.c.max_attempts
        rows = db.execute(
            update(JOBS)
            .where(JOBS.c.status == JOB_RUNNING, JOBS.c.lease_until < now)
            .values(
                status=case((exhausted, JOB_FAILED), else_=JOB_QUEUED),
                finished_at=case((exhausted, now), else_=None),
                error=LEASE_EXPIRED_ERROR,
                worker_id=None,
                lease_until=None,
                run_after=now,
                updated_at=now,
            )
            .returning(JOBS.c.id, JOBS.c.status)
        ).all()
        failed = [int(row.id) for row in rows if row.status == JOB_FAILED]
        if failed:
            _fail_waiters(db, job_ids=failed, error=LEASE_EXPIRED_ERROR)
            notify_finished(db, failed)
    publish_finished(failed)
    return len(rows)


def _held_by(job_id: int, worker_id: str) -> tuple[Any, ...]:
    return (JOBS.c.id == job_id, JOBS.c.worker_id == worker_id, JOBS.c.status == JOB_RUNNING)


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


def _fail_waiters(db: Session, *, job_ids: list[int], error: str, error_code: str | None = None) -> None:
    db.execute(
        update(WAITERS)
        .where(WAITERS.c.job_id.in_(job_ids), WAITERS.c.status == WAITER_PENDING)
        .values(status=WAITER_FAILED, error=error, error_code=error_code, resolved_at=utcnow())
    )


# ------------------------------------------------------------------------------------------ reads


def get_job(session: Bind, *, job_id: int) -> JobRecord:
    """One job; `NotFoundError` when there is none with that id."""
    with bound_session(session) as db:
        row = db.execute(select(JOBS).where(JOBS.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"No job with id {job_id}.")
        return JobRecord.from_row(row)


def list_jobs(
    session: Bind,
    *,
    status: str | Sequence[str] | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[JobRecord]:
    """Jobs, newest first, optionally of one status or several."""
    statuses = [status] if isinstance(status, str) else list(status or [])
    unknown = set(statuses) - set(JOB_STATUSES)
    if unknown:
        raise ValueError(f"unknown job status {sorted(unknown)}; expected one of {list(JOB_STATUSES)}")
    query = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit).offset(offset)
    if statuses:
        query = query.where(JOBS.c.status.in_(statuses))
    with bound_session(session) as db:
        return [JobRecord.from_row(row) for row in db.execute(query).mappings()]


def finished_jobs(session: Bind, *, job_ids: Sequence[int]) -> list[JobRecord]:
    """Those of `job_ids` that have ended (`succeeded` or `failed`), in one query: what a process
    watching many jobs reads when it is told, or its poll says, that some may have ended."""
    if not job_ids:
        return []
    query = select(JOBS).where(JOBS.c.id.in_(list(job_ids)), JOBS.c.status.in_(FINISHED_JOB_STATUSES))
    with bound_session(session) as db:
        return [JobRecord.from_row(row) for row in db.execute(query).mappings()]


def job_counts(session: Bind) -> dict[str, int]:
    """How many jobs are in each status (every status present, zero included)."""
    with bound_session(session) as db:
        counted = db.execute(select(JOBS.c.status, func.count()).group_by(JOBS.c.status)).all()
    counts: dict[str, int] = dict.fromkeys(JOB_STATUSES, 0)
    counts.update({str(status): int(count) for status, count in counted})
    return counts


def queue_depth(session: Bind) -> int:
    """Jobs waiting for a worker (queued, due or in backoff)."""
    with bound_session(session) as db:
        return int(db.execute(select(func.count()).where(JOBS.c.status == JOB_QUEUED)).scalar_one())


def list_waiters(session: Bind, *, job_id: int, pending_only: bool = False) -> list[WaiterRecord]:
    """The plan requests waiting on a job, oldest first."""
    query = select(WAITERS).where(WAITERS.c.job_id == job_id).order_by(WAITERS.c.id)
    if pending_only:
        query = query.where(WAITERS.c.status == WAITER_PENDING)
    with bound_session(session) as db:
        return [WaiterRecord.from_row(row) for row in db.execute(query).mappings()]


def get_waiter(session: Bind, *, waiter_id: int) -> WaiterRecord:
    """One waiter; `NotFoundError` when there is none with that id."""
    with bound_session(session) as db:
        row = db.execute(select(WAITERS).where(WAITERS.c.id == waiter_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"No job waiter with id {waiter_id}.")
        return WaiterRecord.from_row(row)


def resolve_waiter(session: Bind, *, waiter_id: int, plan_id: int) -> bool:
    """Resolve a pending waiter to a plan stored already (an identical request's). False when the
    waiter is not pending. To store a new plan and resolve in one go, use `save_plan(waiter_id=)`."""
    with write_transaction(session) as db:
        result = db.execute(
            update(WAITERS)
            .where(WAITERS.c.id == waiter_id, WAITERS.c.status == WAITER_PENDING)
            .values(status=WAITER_RESOLVED, plan_id=plan_id, resolved_at=utcnow())
        )
        return _rowcount(result) == 1


def resolve_waiters(session: Bind, *, waiter_ids: Sequence[int], plan_id: int) -> int:
    """`resolve_waiter` for many waiters in one statement; returns how many were still pending
    (a waiter already resolved keeps its plan)."""
    if not waiter_ids:
        return 0
    with write_transaction(session) as db:
        result = db.execute(
            update(WAITERS)
            .where(WAITERS.c.id.in_(list(waiter_ids)), WAITERS.c.status == WAITER_PENDING)
            .values(status=WAITER_RESOLVED, plan_id=plan_id, resolved_at=utcnow())
        )
        return _rowcount(result)


def fail_waiters(
    session: Bind, *, waiter_ids: Sequence[int], error: str, error_code: str | None = None
) -> int:
    """`fail_waiter` for many waiters in one statement; returns how many were still pending."""
    if not waiter_ids:
        return 0
    with write_transaction(session) as db:
        result = db.execute(
            update(WAITERS)
            .where(WAITERS.c.id.in_(list(waiter_ids)), WAITERS.c.status == WAITER_PENDING)
            .values(status=WAITER_FAILED, error=error, error_code=error_code, resolved_at=utcnow())
        )
        return _rowcount(result)


def fail_waiter(session: Bind, *, waiter_id: int, error: str, error_code: str | None = None) -> bool:
    """Mark a pending waiter failed (its plan could not be derived). False when not pending."""
    with write_transaction(session) as db:
        result = db.execute(
            update(WAITERS)
            .where(WAITERS.c.id == waiter_id, WAITERS.c.status == WAITER_PENDING)
            .values(status=WAITER_FAILED, error=error, error_code=error_code, resolved_at=utcnow())
        )
        return _rowcount(result) == 1
