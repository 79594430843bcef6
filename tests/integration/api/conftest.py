"""A real uvicorn server in a subprocess per test module, on SQLite and on PostgreSQL.

Each module gets a fresh database (an SQLite file, or `CREATE DATABASE tuner_api_<random>` on the
local PostgreSQL, dropped after) and its own server; probe results are seeded straight through the
repository, so no worker runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from storage.db import ensure_schema, make_engine
from tests.servers import (
    POSTGRES_ADMIN_URL,
    ServerProcess,
    clean_env,
    fresh_database,
    postgres_reachable,
    start_api_server,
)

__all__ = ["POSTGRES_ADMIN_URL", "Server", "error_of", "postgres_reachable", "start_server", "stop_server"]

TOKEN = "s3cret-token"
SERVER_ENV = {"TUNER_TORCH_MINOR": "2.13", "TUNER_MAX_BODY_BYTES": "100000"}


@dataclass
class Server:
    """A running API server and a handle on its database."""

    base_url: str
    database_url: str
    engine: Engine
    process: ServerProcess
    token: str | None
    env: dict[str, str] = field(default_factory=dict)

    def client(self, *, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def authorized(self) -> httpx.Client:
        return self.client(token=self.token)

    def log(self) -> str:
        return self.process.log()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "postgresql" and not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    with fresh_database(request.param, tmp_path_factory.mktemp("api"), prefix="tuner_api") as url:
        yield url


def start_server(
    database_url: str, log_dir: Path, *, token: str | None = TOKEN, extra_env: dict[str, str] | None = None
) -> Server:
    env = {**SERVER_ENV, **(extra_env or {})}
    process = start_api_server(database_url, log_dir, token=token, env=env)
    engine = make_engine(database_url)
    ensure_schema(engine)  # already at head: the server migrated at start
    return Server(process.base_url, database_url, engine, process, token, clean_env(env, token=token))


def stop_server(server: Server) -> None:
    server.process.stop()
    server.engine.dispose()


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(database_url, tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        stop_server(running)


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The contract's error body, checked for shape."""
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    return dict(body)
