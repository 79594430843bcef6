"""A clean database per test, on SQLite and on PostgreSQL: the same test bodies run on both.

SQLite: a fresh, migrated file under the test's tmp_path. PostgreSQL: a fresh database per test
module, cloned from a migrated template made once per session (`CREATE DATABASE … TEMPLATE`) and
dropped after; each test starts on emptied tables (`TRUNCATE … RESTART IDENTITY`), which is far
quicker than a database per test on a busy server. Migration tests get an empty database of their
own. The PostgreSQL parameters are skipped only when the server is unreachable.
`TUNER_TEST_POSTGRES_URL` points at another server's maintenance database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import ensure_schema, make_engine, session_factory
from storage.models import Base

POSTGRES_ADMIN_URL = os.environ.get(
    "TUNER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@dataclass
class Database:
    """A migrated, empty database for one test."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]

    @property
    def backend(self) -> str:
        return self.engine.dialect.name


class PostgresServer:
    """Creates and drops throw-away databases through the maintenance database."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url: URL = make_url(admin_url)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", pool_size=1)

    def reachable(self) -> bool:
        try:
            with self.admin.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except OperationalError:
            return False

    def create(self, *, template: str | None = None) -> str:
        name = f"tuner_t_{uuid.uuid4().hex[:12]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self.admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}{clause}"))
        return name

    def drop(self, name: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))

    def url(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(POSTGRES_ADMIN_URL)
    if not server.reachable():
        server.admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {server.admin_url.render_as_string()}")
    yield server
    server.admin.dispose()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresServer) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = postgres_server.create()
    engine = make_engine(postgres_server.url(name))
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()
    yield name
    postgres_server.drop(name)


@pytest.fixture(scope="module")
def postgres_module_database(postgres_server: PostgresServer, postgres_template: str) -> Iterator[str]:
    """The URL of a migrated database shared by one test module's PostgreSQL tests."""
    name = postgres_server.create(template=postgres_template)
    yield postgres_server.url(name)
    postgres_server.drop(name)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """The URL of an empty (unmigrated) database."""
    if request.param == "sqlite":
        yield f"sqlite:///{os.fspath(tmp_path)}/tuner.db"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = server.create()
    yield server.url(name)
    server.drop(name)


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Database]:
    """A migrated, empty database on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{os.fspath(tmp_path)}/tuner.db"
        engine = make_engine(url)
        ensure_schema(engine)
    else:
        url = request.getfixturevalue("postgres_module_database")
        engine = make_engine(url)
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield Database(url=url, engine=engine, sessions=session_factory(engine))
    engine.dispose()
