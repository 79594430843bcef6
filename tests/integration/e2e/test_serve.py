"""`tuner serve`: the API plus its own local worker, on an SQLite file, stopped by SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.integration.e2e.conftest import SERVICE_ENV, mlp_request
from tests.servers import TUNER, clean_env, free_port, start_server, stop_process

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
    env = clean_env(SERVICE_ENV)
    env.pop("TUNER_DATABASE_URL", None)
    log_path = tmp_path / "serve.log"
    running = start_server(
        [*TUNER, "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'tuner.db'}"],
        port=port, env=env, log_path=log_path, cwd=tmp_path, timeout=90,
    )  # fmt: skip
    server = running.process
    try:
        answer = httpx.post(running.url("/v1/plans"), params={"wait": 60}, json=mlp_request(56), timeout=90)
        assert answer.status_code == 200, f"{answer.text}\n{running.log()}"
        plan = answer.json()
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == 512
        assert plan["cache_hit"] is False  # its local worker probed it just now

        # The API process never loads torch; the worker child it supervises is the one that may.
        assert not maps_torch(server.pid)
        (worker_pid,) = [
            pid for pid in children_of(server.pid) if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, running.log()
        assert (
            not Path(f"/proc/{worker_pid}").exists()
            or "Z" in Path(f"/proc/{worker_pid}/stat").read_text().split()[2]
        )
    finally:
        stop_process(server)  # SIGKILL for the whole group if it is still there
    text = running.log()
    assert "Started the local worker" in text and "Worker " in text and "stopped." in text
