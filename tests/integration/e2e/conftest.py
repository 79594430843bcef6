"""The whole service in real processes: `tuner serve --no-worker` (uvicorn) and `tuner worker
--backend estimate` subprocesses, sharing a fresh database per module on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, func, select, text

from storage.db import make_engine
from storage.models import JobRow, ProbeRow

REPO = Path(__file__).resolve().parents[3]
POSTGRES_ADMIN_URL = os.environ.get(
    "TUNER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TEST_DEVICE = {"name": "Test GPU 1GiB", "total_memory_bytes": 1 << 30}
FACTORIES = "tests.integration.e2e.factories"
TUNER = [sys.executable, "-c", "from tuner.cli import main; main()"]
"""`tuner …` with this interpreter, whatever the PATH holds."""

# Short leases and polls so that recovery happens in seconds; at most two attempts per job.
SERVICE_ENV = {
    "TUNER_ALLOWED_FACTORY_PACKAGES": "tests",
    "TUNER_LEASE_SECONDS": "2",
    "TUNER_HEARTBEAT_SECONDS": "0.4",
    "TUNER_WORKER_POLL_SECONDS": "0.2",
    "TUNER_RETRY_BACKOFF_SECONDS": "0.2",
    "TUNER_MAX_ATTEMPTS": "2",
    "TUNER_SHUTDOWN_GRACE_SECONDS": "5",
    "PYTHONPATH": str(REPO),  # the probe children import the test factories
}


def mlp_request(
    hidden_dim: int, *, effective_batch_size: int = 512, factory: str | None = None
) -> dict[str, Any]:
    """A plan request for a tiny builtin MLP (`hidden_dim` makes workloads distinct), or for a
    `python` factory, on the 1 GiB test device, estimate backend, checkpointing off."""
    if factory is None:
        model: dict[str, Any] = {
            "family": "builtin",
            "name": "mlp",
            "kwargs": {"hidden_dim": hidden_dim, "num_layers": 2},
        }
    else:
        model = {"family": "python", "factory": factory, "kwargs": {"in_features": 32, "num_classes": 10}}
    return {
        "workload": {"model": model, "inputs": {"kind": "features", "dim": 32}, "precision": "fp32"},
        "effective_batch_size": effective_batch_size,
        "device": TEST_DEVICE,
        "backend": "estimate",
        "policy": {"gradient_checkpointing": "off"},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit; also the rest of its process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _kill_group(process.pid)
    return int(process.returncode)


def _kill_group(pid: int) -> None:
    # Probe children outliving a killed worker are in its process group (each worker gets its own).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Service:
    """An API server and the workers a test starts against one database."""

    database_url: str
    engine: Engine
    log_dir: Path
    base_url: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, **SERVICE_ENV, "TUNER_DATABASE_URL": self.database_url}
        env.pop("TUNER_API_TOKEN", None)
        return env

    def client(self, timeout: float = 180.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def start_api(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        log = (self.log_dir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [*TUNER, "serve", "--no-worker", "--port", str(port), "--db", self.database_url],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

        def healthy() -> bool:
            assert self.api is not None and self.api.poll() is None, self.log("api")
            try:
                return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=90, what="the API server")

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"worker-{name}.log").open("ab")
        process = subprocess.Popen(
            [*TUNER, "worker", "--backend", "estimate", "--db", self.database_url],
            cwd=REPO, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.workers.append(process)
        return process

    def stop_workers(self) -> None:
        for process in self.workers:
            stop_process(process)
        self.workers.clear()

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def probe_rows(self, fingerprint: str | None = None) -> int:
        query = select(func.count()).select_from(ProbeRow)
        if fingerprint is not None:
            query = query.where(ProbeRow.fingerprint == fingerprint)
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def job_rows(self, fingerprint: str) -> int:
        with self.engine.connect() as connection:
            keys = connection.scalars(select(JobRow.key)).all()
        return sum(1 for key in keys if fingerprint in key)

    def wait_for_job(self, job_id: int, *, timeout: float = 120.0) -> dict[str, Any]:
        with self.client() as client:

            def finished() -> dict[str, Any] | None:
                job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed") else None

            found: dict[str, Any] = wait_until(finished, timeout=timeout, what=f"job {job_id}", interval=0.2)
            return found


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database per module: an SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('e2e') / 'tuner.db'}"
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"tuner_e2e_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield str(
            create_engine(POSTGRES_ADMIN_URL).url.set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def service(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The API server for the module (it migrates the database at start); no workers yet."""
    log_dir = tmp_path_factory.mktemp("e2e-logs")
    engine = make_engine(database_url)
    running = Service(database_url, engine, log_dir)
    running.start_api()
    try:
        yield running
    finally:
        running.stop_workers()
        if running.api is not None:
            stop_process(running.api)
        engine.dispose()


@pytest.fixture
def workers(service: Service) -> Iterator[Service]:
    """The service, with every worker the test starts stopped after it."""
    yield service
    service.stop_workers()
