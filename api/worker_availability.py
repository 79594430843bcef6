"""Whether a live worker could run a plan request's probe job: the intake check that turns a job
nobody would ever claim into a clear refusal.

Workers announce themselves in the database while they run (`storage.workers`). A request whose
probe no live worker serves (a `cuda` request on a server whose only worker is `estimate`, a
GPU no cuda worker has, a replica with no workers at all) is refused with 409 `no_worker`, naming
what it needs and what is live. A fleet whose workers start later asks for it on purpose:
`POST /v1/plans?queue_without_worker=true` queues the job anyway, and `GET /v1/jobs/{id}` shows
`worker_available: false` until a worker that can claim it is up.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.errors import NoWorkerError
from storage import repository
from storage.records import JobRecord
from tuner.job_status import JOB_QUEUED
from tuner.spec import PlanRequest
from tuner.units import format_bytes

QUEUE_WITHOUT_WORKER = "queue_without_worker"
"""The query parameter of `POST /v1/plans` that queues a job although no live worker can run it."""
FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}
"""What the flag accepts (case-insensitive)."""


def worker_available(
    session: Session, *, backend: str, device_name: str | None, device_memory_bytes: int | None
) -> bool:
    """Whether a live worker would claim a job of `backend` for that device (None: any)."""
    return any(
        worker.accepts(backend=backend, device_name=device_name, device_memory_bytes=device_memory_bytes)
        for worker in repository.live_workers(session, backend=backend)
    )


def job_worker_available(session: Session, job: JobRecord) -> bool | None:
    """For a queued job: whether a live worker could claim it; None once it is not queued."""
    if job.status != JOB_QUEUED:
        return None
    return worker_available(
        session, backend=job.backend, device_name=job.device_name, device_memory_bytes=job.device_memory_bytes
    )


def require_live_worker(session: Session, request: PlanRequest) -> None:
    """Refuse (`NoWorkerError`, 409 `no_worker`) a request whose probe no live worker could run."""
    device = request.device
    if worker_available(
        session,
        backend=request.backend,
        device_name=device.name if device else None,
        device_memory_bytes=device.total_memory_bytes if device else None,
    ):
        return
    raise NoWorkerError(_refusal(session, request))


def _refusal(session: Session, request: PlanRequest) -> str:
    device = request.device
    if request.backend == "cuda":
        wanted = (
            f"a cuda worker on {device.name} ({format_bytes(device.total_memory_bytes)})"
            if device
            else "a cuda worker (any GPU)"
        )
        remedy = (
            "start 'tuner worker --backend cuda' on a machine with that GPU, ask for backend 'estimate' "
            "(GPU-free, with the device's memory)"
        )
    else:
        wanted = "an estimate worker"
        remedy = "start 'tuner worker --backend estimate' (or 'tuner serve' with its local worker)"
    live = repository.live_workers(session)
    seen = ", ".join(sorted({worker.describe() for worker in live})) if live else "none"
    return (
        f"No live worker can run this request: it needs {wanted}, and the live workers are: {seen}. "
        f"To plan it, {remedy}, or send it with ?{QUEUE_WITHOUT_WORKER}=true to queue it for a "
        "worker that starts later."
    )
