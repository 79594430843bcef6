"""A migrated SQLite database per test, and jobs enqueued the way `POST /v1/plans` enqueues them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from storage import repository
from storage.db import ensure_schema, make_engine
from storage.planning import canonical_request, job_key, job_payload
from storage.records import JobRecord
from tuner.spec import parse_plan_request

TEST_DEVICE = {"name": "Test GPU 2GiB", "total_memory_bytes": 2 << 30}
TORCH_MINOR = "2.13"  # replaced by the installed minor in `enqueue`


def mlp_request(
    *, effective_batch_size: int = 512, checkpointing: str = "off", factory: str | None = None
) -> dict[str, Any]:
    """A plan request for a tiny builtin MLP (or a `python` factory) on the 1 GiB test device."""
    if factory is None:
        model: dict[str, Any] = {
            "family": "builtin",
            "name": "mlp",
            "kwargs": {"hidden_dim": 64, "num_layers": 2},
        }
    else:
        model = {"family": "python", "factory": factory, "kwargs": {"in_features": 32, "num_classes": 10}}
    return {
        "workload": {"model": model, "inputs": {"kind": "features", "dim": 32}, "precision": "fp32"},
        "effective_batch_size": effective_batch_size,
        "device": TEST_DEVICE,
        "backend": "estimate",
        "policy": {"gradient_checkpointing": checkpointing},
    }


@dataclass
class Queue:
    engine: Engine

    def enqueue(self, request_data: dict[str, Any], *, max_attempts: int = 3) -> JobRecord:
        """Enqueue (or join) the probe job for a plan request, with the request as a waiter."""
        from probes.worker import installed_torch_minor

        request = parse_plan_request(request_data)
        minor = installed_torch_minor()
        job, _ = repository.enqueue_or_join(
            self.engine,
            key=job_key(request, minor),
            payload=job_payload(request, minor).stored(),
            max_attempts=max_attempts,
            waiter=canonical_request(request),
        )
        return job

    def job(self, job_id: int) -> JobRecord:
        return repository.get_job(self.engine, job_id=job_id)


@pytest.fixture
def allow_test_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let specs name `tests.…` factories (the settings are re-read by every process)."""
    from tuner.settings import get_settings

    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "tests")
    get_settings.cache_clear()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    engine = make_engine(url)
    ensure_schema(engine)
    yield url, engine
    engine.dispose()


@pytest.fixture
def queue(database: tuple[str, Engine]) -> Queue:
    return Queue(database[1])


def worker_id(tag: str) -> str:
    return f"{socket.gethostname()}:test:{tag}"
