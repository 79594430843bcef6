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
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from storage.db import ensure_schema, make_engine, session_factory
from storage.models import Base
from tests.servers import PostgresAdmin

PREFIX = "tuner_t"
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


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresAdmin]:
    server = PostgresAdmin()
    if not server.reachable():
        server.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {server.describe()}")
    yield server
    server.dispose()


@pytest.fixture(scope="session")
def postgres_template(postgres_server: PostgresAdmin) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    name = postgres_server.create(PREFIX)
    engine = make_engine(postgres_server.url(name))
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()
    yield name
    postgres_server.drop(name)


@pytest.fixture(scope="module")
def postgres_module_database(postgres_server: PostgresAdmin, postgres_template: str) -> Iterator[str]:
    """The URL of a migrated database shared by one test module's PostgreSQL tests."""
    name = postgres_server.create(PREFIX, template=postgres_template)
    yield postgres_server.url(name)
    postgres_server.drop(name)


@pytest.fixture(params=BACKENDS)
def empty_database_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """The URL of an empty (unmigrated) database."""
    if request.param == "sqlite":
        yield f"sqlite:///{os.fspath(tmp_path)}/tuner.db"
        return
    server: PostgresAdmin = request.getfixturevalue("postgres_server")
    name = server.create(PREFIX)
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
