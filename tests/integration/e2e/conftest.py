"""The whole service in real processes: `tuner serve --no-worker` (uvicorn) and `tuner worker
--backend estimate` subprocesses, sharing a fresh database per module on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select

from storage.db import make_engine
from storage.models import JobRow, ProbeRow
from tests.servers import (
    REPO,
    TUNER,
    ServerProcess,
    clean_env,
    free_port,
    fresh_database,
    postgres_reachable,
    start_server,
    start_worker,
    stop_process,
    wait_until,
)

TEST_DEVICE = {"name": "Test GPU 2GiB", "total_memory_bytes": 2 << 30}
FACTORIES = "tests.integration.e2e.factories"

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


@dataclass
class Service:
    """An API server and the workers a test starts against one database."""

    database_url: str
    engine: Engine
    log_dir: Path
    api: ServerProcess | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        assert self.api is not None, "the API server is not started"
        return self.api.base_url

    @property
    def env(self) -> dict[str, str]:
        return clean_env({**SERVICE_ENV, "TUNER_DATABASE_URL": self.database_url})

    def client(self, timeout: float = 180.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def start_api(self) -> None:
        port = free_port()
        self.api = start_server(
            [*TUNER, "serve", "--no-worker", "--port", str(port), "--db", self.database_url],
            port=port, env=self.env, log_path=self.log_dir / "api.log", timeout=90,
        )  # fmt: skip

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        process = start_worker(
            self.database_url, self.log_dir / f"worker-{name}.log", env={**SERVICE_ENV, **env}
        )
        self.workers.append(process)
        return process

    def stop_workers(self) -> None:
        for process in self.workers:
            stop_process(process, timeout=30)
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


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database per module: an SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "postgresql" and not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    with fresh_database(request.param, tmp_path_factory.mktemp("e2e"), prefix="tuner_e2e") as url:
        yield url


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
            running.api.stop(timeout=30)
        engine.dispose()


@pytest.fixture
def workers(service: Service) -> Iterator[Service]:
    """The service, with every worker the test starts stopped after it."""
    yield service
    service.stop_workers()
