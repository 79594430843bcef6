"""Migrations build the schema the models describe, and undo it, on both databases."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

from storage.db import (
    alembic_config,
    current_revision,
    downgrade_schema,
    ensure_schema,
    make_engine,
    upgrade_schema,
)
from storage.models import Base
from tuner.cli import app

TUNER_TABLES = {"probe_results", "trials", "plans", "jobs", "job_waiters"}
REPO = Path(__file__).resolve().parents[3]


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_builds_every_table_and_downgrade_removes_them(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) is None
        ensure_schema(engine)
        assert current_revision(engine) == _head()
        assert set(inspect(engine).get_table_names()) >= TUNER_TABLES

        downgrade_schema(engine, "base")
        assert current_revision(engine) is None
        assert not TUNER_TABLES & set(inspect(engine).get_table_names())

        # And up again: the downgrade left nothing behind that the upgrade trips over.
        upgrade_schema(engine)
        assert current_revision(engine) == _head()
        ensure_schema(engine)  # idempotent at head
        assert current_revision(engine) == _head()
    finally:
        engine.dispose()


def test_models_match_the_migrations(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()
    assert _diff(empty_database_url) == []


def test_autogenerate_sees_a_schema_that_drifted(empty_database_url: str) -> None:
    """The no-diff check above can fail: an index missing from the database is reported."""
    engine = make_engine(empty_database_url)
    try:
        ensure_schema(engine)
        with engine.begin() as connection:
            connection.execute(text("DROP INDEX ix_plans_model"))
    finally:
        engine.dispose()
    diff = _diff(empty_database_url)
    assert [entry[0] for entry in diff] == ["add_index"]  # type: ignore[index]


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/nested/dir/tuner.db")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


def test_connections_opening_a_new_sqlite_database_at_once_all_get_wal(tmp_path: Path) -> None:
    """Processes starting together (replicas, workers) open the new file at the same moment: the
    switch to WAL needs a lock SQLite does not wait for on its own, so each must wait its turn."""
    for round_ in range(50):
        engines = [make_engine(f"sqlite:///{tmp_path}/{round_}/tuner.db") for _ in range(6)]
        modes: list[str] = []

        def open_one(engine: Engine, modes: list[str] = modes) -> None:
            with engine.connect() as connection:
                modes.append(str(connection.exec_driver_sql("PRAGMA journal_mode").scalar()))

        try:
            errors = _at_once(engines, open_one)
        finally:
            for engine in engines:
                engine.dispose()
        assert errors == []
        assert modes == ["wal"] * len(engines)


def _at_once(engines: list[Engine], action: Callable[[Engine], None]) -> list[BaseException]:
    """`action` on each engine in a thread of its own, all released at the same moment: the
    errors they raised."""
    barrier = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def start(engine: Engine) -> None:
        try:
            barrier.wait(timeout=30)
            action(engine)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_cli_upgrades_and_downgrades(empty_database_url: str) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade", "--db", empty_database_url])
    assert result.exit_code == 0, result.output
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) == _head()
        result = runner.invoke(app, ["db", "current", "--db", empty_database_url])
        assert result.exit_code == 0 and result.stdout.strip() == _head()
        result = runner.invoke(app, ["db", "downgrade", "base", "--db", empty_database_url])
        assert result.exit_code == 0, result.output
        assert current_revision(engine) is None
        result = runner.invoke(app, ["db", "downgrade", "no-such-revision", "--db", empty_database_url])
        assert result.exit_code == 1
        assert "no-such-revision" in result.output
    finally:
        engine.dispose()


def test_cli_reads_the_database_url_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/from-env.db"
    monkeypatch.setenv("TUNER_DATABASE_URL", url)
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    engine = make_engine(url)
    try:
        assert current_revision(engine) == _head()
    finally:
        engine.dispose()


def test_cli_reports_an_unreachable_database_in_one_line() -> None:
    result = CliRunner().invoke(app, ["db", "upgrade", "--db", "postgresql://postgres@127.0.0.1:1/none"])
    assert result.exit_code == 1
    assert "Cannot upgrade" in result.output and "Traceback" not in result.output


def test_every_migration_file_is_packaged() -> None:
    """Each file under storage/ that Alembic needs matches a package-data pattern."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "storage"
    ]
    storage = REPO / "storage"
    needed = [
        storage / "alembic.ini",
        *storage.glob("migrations/**/*.py"),
        *storage.glob("migrations/*.mako"),
    ]
    assert len(needed) >= 4
    for path in needed:
        relative = PurePosixPath(path.relative_to(storage).as_posix())
        # As setuptools globs: a '*' does not cross a directory.
        assert any(
            len(relative.parts) == len(PurePosixPath(p).parts) and relative.match(p) for p in patterns
        ), relative


def test_processes_starting_at_once_migrate_once(empty_database_url: str) -> None:
    """API replicas and workers all call ensure_schema at start; the migration lock serializes them."""
    engines = [make_engine(empty_database_url) for _ in range(4)]
    errors = _at_once(engines, ensure_schema)
    try:
        assert errors == []
        assert current_revision(engines[0]) == _head()
    finally:
        for engine in engines:
            engine.dispose()


def test_migration_0005_moves_the_client_fault_code_into_its_column_and_back(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        upgrade_schema(engine, "0004")
        rows = {
            1: "nothing_fits: Nothing fits: not even a micro-batch of 1.",
            2: "The estimate probe child aborted (SIGABRT) before returning a result.",
            3: "device_required: The job names no device.",
        }
        with engine.begin() as connection:
            for job_id, error in rows.items():
                connection.execute(
                    text(
                        "INSERT INTO jobs (id, key, payload, backend, status, attempts, max_attempts, "
                        "run_after, error, created_at, updated_at) VALUES (:id, :key, '{}', 'estimate', "
                        "'failed', 1, 1, CURRENT_TIMESTAMP, :error, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"id": job_id, "key": f"k{job_id}", "error": error},
                )
                connection.execute(
                    text(
                        "INSERT INTO job_waiters (job_id, request, status, error, created_at) "
                        "VALUES (:id, '{}', 'failed', :error, CURRENT_TIMESTAMP)"
                    ),
                    {"id": job_id, "error": error},
                )
        upgrade_schema(engine, "0005")
        for table in ("jobs", "job_waiters"):
            with engine.connect() as connection:
                split = connection.execute(
                    text(
                        f"SELECT error_code, error FROM {table} ORDER BY job_id"
                        if table == "job_waiters"
                        else f"SELECT error_code, error FROM {table} ORDER BY id"
                    )
                ).all()
            assert [tuple(row) for row in split] == [
                ("nothing_fits", "Nothing fits: not even a micro-batch of 1."),
                (None, rows[2]),
                ("device_required", "The job names no device."),
            ], table
        downgrade_schema(engine, "0004")
        with engine.connect() as connection:
            restored = connection.execute(text("SELECT error FROM jobs ORDER BY id")).scalars().all()
            columns = {column["name"] for column in inspect(engine).get_columns("jobs")}
            waiters = connection.execute(text("SELECT count(*) FROM job_waiters")).scalar_one()
        assert restored == list(rows.values()) and "error_code" not in columns
        assert waiters == 3  # dropping the columns rebuilt no table (which would cascade to waiters)
    finally:
        engine.dispose()
