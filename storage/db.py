"""Engines, sessions and the schema: one code path for SQLite and PostgreSQL.

SQLite (the embedded default) runs in WAL mode with a busy timeout and foreign keys on. Its
driver's own transaction handling is turned off so that SQLAlchemy emits `BEGIN` itself: that
makes savepoints work and lets a write take the database lock up front with `BEGIN IMMEDIATE`
(see `IMMEDIATE`), which is how the job queue claims on SQLite. PostgreSQL goes through psycopg 3
with a small pre-pinged pool.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool, StaticPool

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long an SQLite writer waits for the lock before giving up."""

IMMEDIATE = {"tuner_begin_immediate": True}
"""Execution options for a write transaction: on SQLite it begins with `BEGIN IMMEDIATE`, taking
the write lock before the first read, so that a read-then-write never meets a stale snapshot.
Elsewhere it changes nothing."""

# Any constant: the advisory lock that keeps two processes from migrating PostgreSQL at once.
_MIGRATION_LOCK_ID = 0x74756E6572


def normalize_url(url: str | URL) -> URL:
    """The URL SQLAlchemy should use: `postgresql://` and `postgres://` mean psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for `url` (`TUNER_DATABASE_URL`), configured for the tuner's concurrent use."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, echo=echo)
    if parsed.get_backend_name() == "postgresql":
        return create_engine(
            parsed,
            echo=echo,
            pool_size=5,
            max_overflow=10,
            pool_timeout=30,
            # Connections dropped by a restarted server or a proxy are replaced, not reported.
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"application_name": "tuner", "connect_timeout": 10},
        )
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def _sqlite_engine(url: URL, *, echo: bool) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    in_memory = database in ("", ":memory:")
    engine = create_engine(
        url,
        echo=echo,
        # Sessions move between threads (API threadpool, worker heartbeat); SQLite allows it
        # once each connection is used by one thread at a time, which the pool guarantees.
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        # An in-memory database lives and dies with its connection: share the one connection.
        **({"poolclass": StaticPool} if in_memory else {}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below) instead of the driver's implicit, deferred one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if not in_memory:
            _enter_wal_mode(cursor)
            # In WAL mode NORMAL loses no committed transaction on an application crash.
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("tuner_begin_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _enter_wal_mode(cursor: Any) -> None:
    """Put the database in WAL mode (it stays so in the file), waiting for the lock it needs.

    Switching a new database to WAL takes an exclusive lock, and SQLite answers "database is
    locked" at once, without its busy handler, while another connection is reading or switching
    it too: processes that open a new database at the same moment (API replicas and workers at
    their first start) would fail. So each waits its turn, up to the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                # When it cannot switch yet, SQLite may also answer with the old mode.
                mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(f"database stayed in journal mode {mode!r}, not WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def connection_capacity(engine: Engine) -> int:
    """How many connections `engine`'s pool hands out at once: its size plus its overflow (15
    for the engines `make_engine` builds; 1 for an in-memory SQLite database's one connection)."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow
        return pool.size() + (overflow if overflow >= 0 else _UNBOUNDED_POOL_THREADS)
    if isinstance(pool, StaticPool):
        return 1
    return _UNBOUNDED_POOL_THREADS


_UNBOUNDED_POOL_THREADS = 40
"""For a pool without a bound: anyio's default thread count."""


def count_statements(engine: Engine, on_statement: Callable[[], None]) -> None:
    """Call `on_statement` for every SQL statement `engine` sends (queries, writes, `BEGIN`): what
    the API's `tuner_db_statements_total` counts, so that a change in how often it asks shows."""

    def _counted(*_args: Any) -> None:
        on_statement()

    event.listen(engine, "before_cursor_execute", _counted)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine`. Objects stay readable after commit (repository functions
    return plain records, but callers' own ORM use should not reload on every attribute)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def is_postgresql(bind: Engine | Connection | Session) -> bool:
    """True when `bind` talks to PostgreSQL (else SQLite)."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return engine.dialect.name == "postgresql"


def dialect_insert(db: Session, target: type[Any] | Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's own INSERT for `target` (a mapped class or a table): PostgreSQL's or SQLite's,
    the two databases the tuner runs on; both have `on_conflict_do_nothing/do_update`, which the
    job queue, the worker registry and the probe and plan caches rely on."""
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(target)
    if dialect == "sqlite":
        return sqlite.insert(target)
    raise NotImplementedError(f"the tuner stores its data in PostgreSQL or SQLite, not {dialect}")


def alembic_config(url: str | URL | None = None) -> Any:
    """The packaged Alembic configuration (`storage/alembic.ini`), pointed at `url` if given."""
    from alembic.config import Config

    package = Path(__file__).resolve().parent
    config = Config(str(package / "alembic.ini"))
    config.set_main_option("script_location", str(package / "migrations"))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        # ConfigParser interpolates '%': escape it so that passwords with '%' survive.
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """One connection in one transaction, holding the lock that serializes migrations."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.execution_options(**IMMEDIATE)
        with connection.begin():
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            yield connection


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision`; safe when several processes start at once."""
    from alembic import command

    config = alembic_config()
    with _migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Run the migrations down to `revision` (`base` empties the database of tuner tables)."""
    from alembic import command

    config = alembic_config()
    with _migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Bring the database to the newest schema: what the embedded default does at start."""
    upgrade_schema(engine, "head")


Bind = Session | Engine
"""What repository functions take: a session, or an engine to open a short session on."""


@contextmanager
def bound_session(bind: Bind) -> Iterator[Session]:
    """`bind` itself when it is a session; else a short session on the engine, closed after."""
    if isinstance(bind, Session):
        yield bind
        return
    with Session(bind, expire_on_commit=False) as session:
        yield session


@contextmanager
def write_transaction(bind: Bind) -> Iterator[Session]:
    """One write transaction of its own, committed at the end (rolled back on an exception).

    A transaction the session already has open is committed first: on SQLite its read snapshot
    could be stale, and a stale snapshot cannot take the write lock (SQLITE_BUSY_SNAPSHOT, which
    no busy timeout waits out). The new transaction then begins with `BEGIN IMMEDIATE` on SQLite.
    """
    with bound_session(bind) as session:
        if session.in_transaction():
            session.commit()
        session.connection(execution_options=IMMEDIATE)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
