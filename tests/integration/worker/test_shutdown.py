"""`tuner worker` as a process: SIGTERM lets the current job finish within the grace period, or
releases it to the queue; either way the worker exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from storage.models import ProbeRow
from tests import servers
from tests.integration.worker.conftest import Queue, mlp_request

pytestmark = pytest.mark.slow


def start_worker(url: str, log_path: Path, *, grace_seconds: float) -> subprocess.Popen[bytes]:
    env = {
        "TUNER_SHUTDOWN_GRACE_SECONDS": str(grace_seconds),
        "TUNER_WORKER_POLL_SECONDS": "0.1",
        "TUNER_HEARTBEAT_SECONDS": "0.5",
    }
    return servers.start_worker(url, log_path, env=env)


def wait_running(queue: Queue, job_id: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while queue.job(job_id).status != "running":
        assert process.poll() is None, "the worker exited early"
        assert time.monotonic() < deadline, "the worker never claimed the job"
        time.sleep(0.05)


def probe_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(ProbeRow)) or 0)


def stop(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_sigterm_past_the_grace_period_releases_the_job(
    database: tuple[str, Engine], queue: Queue, tmp_path: Path
) -> None:
    url, engine = database
    job = queue.enqueue(mlp_request())
    log_path = tmp_path / "worker.log"
    process = start_worker(url, log_path, grace_seconds=0)
    wait_running(queue, job.id, process)

    process.send_signal(signal.SIGTERM)

    assert stop(process, 30) == 0, log_path.read_text()
    released = queue.job(job.id)
    assert released.status == "queued" and released.attempts == 0 and released.worker_id is None
    assert probe_rows(engine) == 0
    assert f"Released job {job.id} back to the queue" in log_path.read_text()


def test_sigterm_within_the_grace_period_lets_the_job_finish(
    database: tuple[str, Engine], queue: Queue, tmp_path: Path
) -> None:
    url, engine = database
    job = queue.enqueue(mlp_request())
    log_path = tmp_path / "worker.log"
    process = start_worker(url, log_path, grace_seconds=120)
    wait_running(queue, job.id, process)

    process.send_signal(signal.SIGTERM)

    assert stop(process, 150) == 0, log_path.read_text()
    assert queue.job(job.id).status == "succeeded"
    assert probe_rows(engine) == 1
    text = log_path.read_text()
    assert f"Claimed job {job.id}" in text and f"Finished job {job.id}" in text
