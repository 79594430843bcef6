"""Plain records the repository returns for jobs and waiters, and the filter a worker claims with.

Frozen dataclasses, not ORM rows: a caller never holds an object bound to a session.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuner.job_status import ACTIVE_JOB_STATUSES


@dataclass(frozen=True)
class JobRecord:
    """One probe job as stored."""

    id: int
    key: str
    """One job per key: the probes it produces (`storage.planning.job_key`)."""
    payload: dict[str, Any]
    """What to probe, as given to `enqueue_or_join`."""
    backend: str
    device_name: str | None
    """The device the job needs (None: any device of the backend)."""
    device_memory_bytes: int | None
    status: str
    """`queued`, `running`, `succeeded` or `failed`."""
    attempts: int
    """Claims so far; a job released on shutdown gives its attempt back."""
    max_attempts: int
    run_after: datetime
    """Not claimed before this time (retry backoff)."""
    lease_until: datetime | None
    """While running: the worker must heartbeat before this, or the job is requeued."""
    heartbeat_at: datetime | None
    worker_id: str | None
    error: str | None
    """The last error's sentence (kept while retrying; cleared on success)."""
    error_code: str | None
    """The code of a failure the request caused (`tuner.errors.CLIENT_FAULT_CODES`); None for a
    failure of the service, and while the job has not failed."""
    progress: dict[str, Any] | None
    """What the worker last reported (e.g. trials so far)."""
    probe_id: int | None
    """The probe result the job stored, once succeeded."""
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    """When the latest attempt was claimed."""
    finished_at: datetime | None

    @property
    def active(self) -> bool:
        """True while queued or running."""
        return self.status in ACTIVE_JOB_STATUSES

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobRecord:
        """From a `jobs` table row (a Core row mapping)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class WaiterRecord:
    """A plan request waiting on a job."""

    id: int
    job_id: int
    request: dict[str, Any]
    """The plan request to derive once the job's probe is stored."""
    status: str
    """`pending`, `resolved` (see `plan_id`) or `failed` (see `error`)."""
    plan_id: int | None
    error: str | None
    error_code: str | None
    """The client-fault code of `error`, as on the job."""
    created_at: datetime
    resolved_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> WaiterRecord:
        """From a `job_waiters` table row (a Core row mapping)."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Accepts:
    """Jobs a worker can run. None in a field accepts any value; a job that names no device is
    accepted by any worker of its backend."""

    backend: str | None = None
    """`cuda` or `estimate` (None: either)."""
    device_name: str | None = None
    """The worker's device name, as `torch.cuda.get_device_name` reports it."""
    device_memory_bytes: int | None = None
    """The worker's device's total memory in bytes."""
