"""Worker bodies run in separate (spawned) processes by the queue tests: each opens its own engine,
as a real worker process does. Importable by module path so that `spawn` can find them."""

from __future__ import annotations

import time
from typing import Any

from storage.db import make_engine
from storage.jobs import claim_job, complete_job, fail_job, heartbeat


def claim_until_empty(url: str, worker_id: str, probe_id: int, start: Any, results: Any) -> None:
    """Claim and complete jobs until none is left; report the ids claimed."""
    engine = make_engine(url)
    claimed: list[int] = []
    try:
        start.wait(timeout=60)
        while (job := claim_job(engine, worker_id=worker_id, lease_seconds=60)) is not None:
            claimed.append(job.id)
            time.sleep(0.002)  # some work, so that workers interleave
            if not complete_job(engine, job_id=job.id, worker_id=worker_id, probe_id=probe_id):
                raise RuntimeError(f"{worker_id} lost job {job.id}")
    finally:
        results.put((worker_id, claimed))
        engine.dispose()


def claim_and_hang(url: str, worker_id: str, lease_seconds: float, claimed: Any) -> None:
    """Claim one job, heartbeat once, report it, then hang until killed."""
    engine = make_engine(url)
    job = claim_job(engine, worker_id=worker_id, lease_seconds=lease_seconds)
    if job is not None:
        heartbeat(
            engine, job_id=job.id, worker_id=worker_id, lease_seconds=lease_seconds, progress={"trials": 1}
        )
    claimed.put(None if job is None else job.id)
    time.sleep(600)


def end_jobs(url: str, worker_id: str, succeeds: int, fails: int, probe_id: int) -> None:
    """End two claimed jobs as their worker: one completed, one failed for good."""
    engine = make_engine(url)
    try:
        if not complete_job(engine, job_id=succeeds, worker_id=worker_id, probe_id=probe_id):
            raise RuntimeError(f"{worker_id} does not hold job {succeeds}")
        if (
            fail_job(
                engine, job_id=fails, worker_id=worker_id, error="boom", retry_backoff_seconds=0, retry=False
            )
            is None
        ):
            raise RuntimeError(f"{worker_id} does not hold job {fails}")
    finally:
        engine.dispose()


def complete_one(url: str, worker_id: str, job_id: int, probe_id: int) -> None:
    """Complete a claimed job as its worker, from this (other) process."""
    engine = make_engine(url)
    try:
        if not complete_job(engine, job_id=job_id, worker_id=worker_id, probe_id=probe_id):
            raise RuntimeError(f"{worker_id} does not hold job {job_id}")
    finally:
        engine.dispose()
