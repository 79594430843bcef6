"""The jobs page's view models, from the stored probe jobs: queued and running, what the worker
last reported, in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.worker_availability import job_worker_available
from storage import repository
from storage.records import JobRecord
from tuner.job_status import JOB_QUEUED, JOB_RUNNING


@dataclass(frozen=True)
class JobView:
    job: JobRecord
    model: str
    checkpointing: str
    progress: str


def jobs_context(session: Session) -> dict[str, Any]:
    """`jobs.html`'s context: the running and queued jobs, and the count of jobs by status."""
    jobs = repository.list_jobs(session, status=["running", "queued"], limit=200)
    # Running first (they move), then queued, each newest first.
    jobs.sort(key=lambda job: job.status != JOB_RUNNING)
    counts = repository.job_counts(session)
    views = [
        JobView(
            job=job,
            model=describe_workload_data(job.payload.get("workload")),
            checkpointing=_checkpointing_choices(job.payload.get("gradient_checkpointing")),
            progress=describe_progress(job, job_worker_available(session, job)),
        )
        for job in jobs
    ]
    return {"jobs": views, "counts": counts}


def describe_workload_data(data: Any) -> str:
    """A job payload's workload, named as `WorkloadSpec.describe` names it, from the raw dict
    (a payload is not re-validated to be shown)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return "unknown model"
    family = model.get("family")
    config = model.get("config")
    if family == "transformers" and isinstance(config, dict):
        return str(config.get("model_type", "transformers model"))
    if family == "python":
        return str(model.get("factory", "python factory"))
    return str(model.get("name", family or "unknown model"))


def _checkpointing_choices(choices: Any) -> str:
    if not isinstance(choices, list) or not choices:
        return "—"
    return ", ".join("on" if choice else "off" for choice in choices)


def describe_progress(job: JobRecord, worker_available: bool | None = None) -> str:
    """What the worker last reported, in words (for a queued job: whether a live worker could
    claim it, `api.worker_availability`)."""
    if job.status == JOB_QUEUED:
        waiting = (
            f"no live {job.backend} worker can run it yet"
            if worker_available is False
            else "waiting for a worker"
        )
        return f"{waiting} (retry {job.attempts + 1} of {job.max_attempts})" if job.attempts else waiting
    progress = job.progress or {}
    trials = progress.get("trials")
    if not isinstance(trials, int) or trials == 0:
        return "starting"
    checkpointing = "on" if progress.get("gradient_checkpointing") else "off"
    text = f"{trials} trial{'s' if trials != 1 else ''} (checkpointing {checkpointing})"
    last = progress.get("last_batch_size")
    if isinstance(last, int):
        outcome = "fit" if progress.get("ok") else "did not fit"
        text += f"; last: micro-batch {last} {outcome}"
    return text
