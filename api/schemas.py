"""Request and response bodies of the HTTP API (docs/contract.md), separate from the storage rows.

Plan requests, plans and probe results are the domain's own pydantic models (`tuner.spec`,
`tuner.results`); this module adds what only the API has: jobs, lists and errors.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, Field

from tuner.job_status import JobStatus
from tuner.results import Plan, ProbeResult
from tuner.spec import PlanRequest

__all__ = ["ErrorOut", "HealthOut", "JobOut", "Plan", "PlanList", "PlanRequest", "ProbeResult", "RowId"]


RowId = Annotated[int, Path(ge=1, le=(1 << 31) - 1, description="A row id.")]
"""Ids are 32-bit integers in the database: larger ones are a 422, not a database error."""


class ErrorOut(BaseModel):
    """Every error response."""

    detail: str
    """One clear sentence for people."""
    code: str
    """A stable machine code: `invalid_spec`, `not_found`, `unauthorized`, ..."""


class JobOut(BaseModel):
    """A probe job: what a 202 returns and `GET /v1/jobs/{id}` shows."""

    id: int
    status: JobStatus
    attempts: int
    max_attempts: int
    error: str | None = None
    """Why the last attempt failed (`<code>: <sentence>` where the request is at fault)."""
    error_code: str | None = None
    """Once the job failed: the machine code its waiters get, the request's own mistake
    (`nothing_fits`, `model_build_failed`, ... answered 422) or `probe_failed` (503)."""
    plan_id: int | None = None
    """The plan derived for the job's first request that got one, once the job succeeded."""
    probe_id: int | None = None
    worker_available: bool | None = None
    """While queued: whether a live worker could claim the job (false: none can yet; it was
    queued with `queue_without_worker=true` and waits until one starts). None once claimed."""
    progress: dict[str, Any] | None = None
    """Trials so far, last batch size, ... as the worker reports them."""
    backend: str
    device_name: str | None = None
    """None: any worker of the backend may run it."""
    device_memory_bytes: int | None = None
    gradient_checkpointing: list[bool] = Field(default_factory=list)
    """The checkpointing choices the job probes."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    location: str
    """This job's URL."""
    plan_location: str | None = None
    """The derived plan's URL, once there is one."""


class PlanList(BaseModel):
    """`GET /v1/plans`: a page of plans, newest first, and how many match in all."""

    items: list[Plan]
    total: int


class HealthOut(BaseModel):
    """`GET /healthz`."""

    status: Literal["ok"]
    database: Literal["ok"]
