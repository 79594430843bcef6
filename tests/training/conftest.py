"""The real tuner service for the training-side tests: the API under uvicorn on an SQLite file,
with a write token, and one `tuner worker --backend estimate` that finishes the probe jobs.

One service for the whole package: it starts when a test first asks for it and stops after the
package's last test. The tests keep out of each other's way by using workloads and devices of
their own. Tests that need a state (a probe already measured, a job that failed) write it through
`storage.repository`, the way the service itself would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import Engine

from storage.db import make_engine
from tests.servers import ServerProcess, start_api_server, start_worker, stop_process

TOKEN = "training-token"
_unique = count(1)


@dataclass
class Service:
    """The running API (`server`), its database (`engine`) and its token."""

    server: ServerProcess
    engine: Engine
    token: str

    @property
    def url(self) -> str:
        return self.server.base_url


def unique_number() -> int:
    """A number no other test of this session gets: for workloads and devices of a test's own."""
    return next(_unique)


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    directory: Path = tmp_path_factory.mktemp("training-service")
    database_url = f"sqlite:///{directory / 'tuner.db'}"
    server = start_api_server(database_url, directory, token=TOKEN)
    # Quick polls so that a job is claimed within a fraction of a second of its POST.
    worker = start_worker(database_url, directory / "worker.log", env={"TUNER_WORKER_POLL_SECONDS": "0.1"})
    engine = make_engine(database_url)
    try:
        yield Service(server, engine, TOKEN)
    finally:
        stop_process(worker, timeout=30)
        server.stop()
        engine.dispose()
