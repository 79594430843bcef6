"""`tuner serve`: the API plus its own local worker, on an SQLite file, stopped by SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.e2e.conftest import SERVICE_ENV, TUNER, free_port, mlp_request, wait_until

pytestmark = pytest.mark.slow


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_serve_plans_with_its_local_worker_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "tuner.db"
    env = {**os.environ, **SERVICE_ENV}
    env.pop("TUNER_DATABASE_URL", None)
    env.pop("TUNER_API_TOKEN", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [*TUNER, "serve", "--port", str(port), "--db", f"sqlite:///{database}"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert server.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=90, what="tuner serve")
        answer = httpx.post(f"{base_url}/v1/plans", params={"wait": 60}, json=mlp_request(56), timeout=90)
        assert answer.status_code == 200, f"{answer.text}\n{log_path.read_text()}"
        plan = answer.json()
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == 512
        assert plan["cache_hit"] is False  # its local worker probed it just now

        # The API process never loads torch; the worker child it supervises is the one that may.
        assert not maps_torch(server.pid)
        (worker_pid,) = [
            pid for pid in children_of(server.pid) if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log_path.read_text()
        assert (
            not Path(f"/proc/{worker_pid}").exists()
            or "Z" in Path(f"/proc/{worker_pid}/stat").read_text().split()[2]
        )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "Started the local worker" in text and "Worker " in text and "stopped." in text
