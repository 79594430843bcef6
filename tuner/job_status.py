"""The states of a probe job and of a plan request waiting on one: the queue stores them, the API
and the client report them, the pages show them."""

from __future__ import annotations

from typing import Final, Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed"]
JOB_QUEUED: Final = "queued"
JOB_RUNNING: Final = "running"
JOB_SUCCEEDED: Final = "succeeded"
JOB_FAILED: Final = "failed"
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
ACTIVE_JOB_STATUSES: tuple[JobStatus, ...] = (JOB_QUEUED, JOB_RUNNING)
"""A job in one of these still has a worker's attention ahead (one per key: `storage.jobs`)."""
FINISHED_JOB_STATUSES: tuple[JobStatus, ...] = (JOB_SUCCEEDED, JOB_FAILED)

WaiterStatus = Literal["pending", "resolved", "failed"]
WAITER_PENDING: Final = "pending"
WAITER_RESOLVED: Final = "resolved"
WAITER_FAILED: Final = "failed"
WAITER_STATUSES: tuple[WaiterStatus, ...] = get_args(WaiterStatus)


def sql_in(statuses: tuple[str, ...]) -> str:
    """`status IN ('queued', 'running')`: the SQL condition of a partial index or a check."""
    return "status IN (" + ", ".join(f"'{status}'" for status in statuses) + ")"
