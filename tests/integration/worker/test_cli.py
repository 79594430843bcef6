"""`tuner worker` command-line behaviour on a machine without a GPU (this one, or CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage import repository
from tests.integration.worker.conftest import Queue, mlp_request

REPO = Path(__file__).resolve().parents[3]


def tuner(*args: str, url: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNER_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-c", "from tuner.cli import main; main()", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def has_gpu() -> bool:
    from probes.local_gpu import detect_local_gpu

    return detect_local_gpu() is not None


def test_a_cuda_worker_without_a_gpu_says_so(database: tuple[str, object]) -> None:
    if has_gpu():
        pytest.skip("this machine has a GPU")
    done = tuner("worker", "--backend", "cuda", "--once", url=database[0])
    assert done.returncode == 1
    assert "No CUDA GPU is visible to this process" in done.stderr


def test_device_flags_come_in_pairs(database: tuple[str, object]) -> None:
    done = tuner("worker", "--backend", "estimate", "--device-name", "A100", url=database[0])
    assert done.returncode == 1
    assert "--device-name and --device-memory together" in done.stderr


@pytest.mark.slow
def test_once_runs_one_job_and_auto_picks_estimate_without_a_gpu(
    database: tuple[str, object], queue: Queue
) -> None:
    if has_gpu():
        pytest.skip("this machine has a GPU: auto would pick cuda")
    first = queue.enqueue(mlp_request(effective_batch_size=256))
    second = queue.enqueue(mlp_request(effective_batch_size=256, checkpointing="on"))

    done = tuner("worker", "--backend", "auto", "--once", url=database[0])

    assert done.returncode == 0, done.stderr
    assert "No CUDA GPU found: serving estimate jobs." in done.stderr
    assert queue.job(first.id).status == "succeeded"
    assert queue.job(second.id).status == "queued"  # --once: one job, then exit
    assert repository.queue_depth(queue.engine) == 1
