"""The workers that are up: each running worker keeps a row renewed (`announce_worker`), removes it
when it stops (`retire_worker`), and `live_workers` is what the API asks before it queues a job.

A row is a lease like a job's: alive until `expires_at`; a worker that dies without retiring
simply stops renewing it. Expired rows are deleted by the next announcement of any worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, select

from storage.db import Bind, bound_session, dialect_insert, write_transaction
from storage.models import WorkerRow, utcnow
from storage.records import Accepts

WORKERS = cast(Table, WorkerRow.__table__)


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker as stored."""

    worker_id: str
    backend: str
    device_name: str | None
    """Its GPU (cuda); None: any device (estimate)."""
    device_memory_bytes: int | None
    started_at: datetime
    seen_at: datetime
    expires_at: datetime

    def accepts(self, *, backend: str, device_name: str | None, device_memory_bytes: int | None) -> bool:
        """Whether this worker may claim a job of `backend` for that device (None: any device),
        by the same rule as the claim (`storage.jobs.claim_job`)."""
        if self.backend != backend:
            return False
        if device_name is not None and self.device_name is not None and device_name != self.device_name:
            return False
        return not (
            device_memory_bytes is not None
            and self.device_memory_bytes is not None
            and device_memory_bytes != self.device_memory_bytes
        )

    def describe(self) -> str:
        """`cuda on NVIDIA H100 80GB HBM3` or `estimate`, for messages."""
        return self.backend if self.device_name is None else f"{self.backend} on {self.device_name}"


def announce_worker(session: Bind, *, worker_id: str, accepts: Accepts, ttl_seconds: float) -> None:
    """Register the worker, or renew its row: alive for `ttl_seconds` from now."""
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    if accepts.backend is None:
        raise ValueError("a worker announces the one backend it serves")
    with write_transaction(session) as db:
        now = utcnow()
        values: dict[str, Any] = {
            "worker_id": worker_id,
            "backend": accepts.backend,
            "device_name": accepts.device_name,
            "device_memory_bytes": accepts.device_memory_bytes,
            "started_at": now,
            "seen_at": now,
            "expires_at": now + timedelta(seconds=ttl_seconds),
        }
        insert = dialect_insert(db, WORKERS)
        renewed = {"seen_at": now, "expires_at": values["expires_at"]}
        db.execute(insert.values(**values).on_conflict_do_update(index_elements=["worker_id"], set_=renewed))
        db.execute(delete(WORKERS).where(WORKERS.c.expires_at < now))


def retire_worker(session: Bind, *, worker_id: str) -> None:
    """Remove the worker's row (it is stopping)."""
    with write_transaction(session) as db:
        db.execute(delete(WORKERS).where(WORKERS.c.worker_id == worker_id))


def live_workers(session: Bind, *, backend: str | None = None) -> list[WorkerRecord]:
    """Workers whose row has not expired, oldest first, optionally of one backend."""
    query = select(WORKERS).where(WORKERS.c.expires_at >= utcnow()).order_by(WORKERS.c.started_at)
    if backend is not None:
        query = query.where(WORKERS.c.backend == backend)
    with bound_session(session) as db:
        return [
            WorkerRecord(**{name: row[name] for name in WorkerRecord.__dataclass_fields__})
            for row in db.execute(query).mappings()
        ]
