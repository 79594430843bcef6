"""`/healthz` reports a database that stopped answering with 503, and so do the routes that need it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.api.conftest import (
    POSTGRES_ADMIN_URL,
    Server,
    error_of,
    postgres_reachable,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def doomed_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"tuner_api_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    server = start_server(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", tmp_path)
    try:
        yield server, name
    finally:
        stop_server(server)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_a_lost_database_is_a_503(doomed_server: tuple[Server, str]) -> None:
    server, name = doomed_server
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        server.engine.dispose()
        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
        down = client.get("/healthz")
        assert down.status_code == 503 and error_of(down)["code"] == "database_unavailable"
        listing = client.get("/v1/plans")
        assert listing.status_code == 503 and error_of(listing)["code"] == "database_unavailable"
