"""Identity in the database: one plan per (request, probes) and one probe result per cache key,
however many callers store at once; and migration 0002, which brought both to existing data."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, Table, func, insert, inspect, select

from storage.db import downgrade_schema, make_engine, upgrade_schema
from storage.identity import plan_request_hash
from storage.models import Base, PlanRow, ProbeRow, TrialRow
from storage.repository import (
    _plan_values,
    _probe_values,
    add_waiter,
    enqueue_or_join,
    find_cached_probe,
    find_plan_by_request,
    get_plan,
    get_probe,
    get_waiter,
    list_plans,
    save_plan,
    save_plan_or_existing,
    save_probe,
    save_probe_or_existing,
)
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import H100, gpt2_workload, plan, plan_request, probe_result
from tuner.probe_key import ProbeKey

T = TypeVar("T")


def race(count: int, call: Callable[[], T]) -> list[T]:
    """`call` in `count` threads released at once by a barrier; their results."""
    barrier = threading.Barrier(count)

    def run() -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(run) for _ in range(count)]
        return [future.result(timeout=120) for future in futures]


def count_rows(engine: Engine, model: type[Base]) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


# ---------------------------------------------------------------------------------------- plans


def test_concurrent_saves_of_one_plan_store_one_row(database: Database) -> None:
    workload = gpt2_workload()
    probe_id = save_probe(database.engine, result=probe_result(workload=workload))
    stored = plan(workload=workload, probe_id=probe_id)
    request = plan_request(workload)

    def save() -> tuple[int, bool]:
        with database.sessions() as session:
            return save_plan_or_existing(session, plan=stored, request=request)

    outcomes = race(20, save)

    assert len({plan_id for plan_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    assert count_rows(database.engine, PlanRow) == 1
    identity = plan_request_hash(request, {"off": probe_id})
    found = find_plan_by_request(database.engine, request_hash=identity)
    assert found is not None and found.id == outcomes[0][0]


def test_a_plan_is_identified_by_its_request_and_its_probes(database: Database) -> None:
    workload = gpt2_workload()
    first_probe = save_probe(database.engine, result=probe_result(workload=workload))
    other_probe = save_probe(database.engine, result=probe_result(workload=workload, torch_version="2.14.0"))
    request = plan_request(workload)
    with database.sessions() as session:
        first = save_plan(session, plan=plan(workload=workload, probe_id=first_probe), request=request)
        same = save_plan(session, plan=plan(workload=workload, probe_id=first_probe), request=request)
        from_other_probe = save_plan(
            session, plan=plan(workload=workload, probe_id=other_probe), request=request
        )
        other_request = save_plan(
            session,
            plan=plan(workload=workload, probe_id=first_probe),
            request=plan_request(workload, effective_batch_size=256),
        )
        assert same == first
        assert len({first, from_other_probe, other_request}) == 3
        assert find_plan_by_request(session, request_hash=plan_request_hash(request, {"off": 999})) is None
        found = find_plan_by_request(session, request_hash=plan_request_hash(request, {"off": other_probe}))
        assert found is not None and found.id == from_other_probe
    assert count_rows(database.engine, PlanRow) == 3


def test_the_identity_hash_is_the_documented_one() -> None:
    """SHA-256 of {"probe_ids": ..., "request": ...} with sorted keys, no whitespace and ASCII
    escapes: key order in the request does not matter, probe ids do."""
    request = {"effective_batch_size": 8, "backend": "cuda", "device": {"name": "GPU é"}}
    document = (
        '{"probe_ids":{"off":1},"request":{"backend":"cuda","device":{"name":"GPU \\u00e9"},'
        '"effective_batch_size":8}}'
    )
    digest = plan_request_hash(dict(reversed(list(request.items()))), {"off": 1})
    assert digest == hashlib.sha256(document.encode()).hexdigest()
    assert plan_request_hash(request, {"off": 2}) != digest
    assert plan_request_hash(request, {"off": 1, "on": 2}) != digest


def test_a_waiter_resolves_to_the_plan_another_process_stored(database: Database) -> None:
    workload = gpt2_workload()
    probe_id = save_probe(database.engine, result=probe_result(workload=workload))
    request = plan_request(workload)
    with database.sessions() as session:
        stored = save_plan(session, plan=plan(workload=workload, probe_id=probe_id), request=request)
        job, _ = enqueue_or_join(session, key="k", payload=request, max_attempts=1, waiter=request)
        waiter_id = add_waiter(session, job_id=job.id, request=request)
        plan_id, created = save_plan_or_existing(
            session, plan=plan(workload=workload, probe_id=probe_id), request=request, waiter_id=waiter_id
        )
        assert (plan_id, created) == (stored, False)
        waiter = get_waiter(session, waiter_id=waiter_id)
        assert (waiter.status, waiter.plan_id) == ("resolved", stored)
    assert count_rows(database.engine, PlanRow) == 1


# --------------------------------------------------------------------------------------- probes


def test_concurrent_saves_of_one_probe_key_store_one_row(database: Database) -> None:
    workload = gpt2_workload()

    def save(max_batch_size: int) -> tuple[int, bool]:
        with database.sessions() as session:
            return save_probe_or_existing(
                session, result=probe_result(workload=workload, max_batch_size=max_batch_size)
            )

    sizes = iter(range(51, 59))
    lock = threading.Lock()

    def next_upload() -> tuple[int, bool]:
        with lock:
            size = next(sizes)
        return save(size)

    outcomes = race(8, next_upload)

    assert len({probe_id for probe_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    assert count_rows(database.engine, ProbeRow) == 1
    assert count_rows(database.engine, TrialRow) == 3  # the winner's trials only
    stored = get_probe(database.engine, probe_id=outcomes[0][0])
    assert [t.batch_size for t in stored.trials] == [48, 52, stored.max_batch_size]
    hit = find_cached_probe(
        database.engine,
        ProbeKey(
            fingerprint=workload.fingerprint(),
            device_name=H100.name,
            device_memory_bytes=H100.total_memory_bytes,
            backend="cuda",
            torch_minor="2.13",
            gradient_checkpointing=False,
            alloc_conf="expandable_segments:True",
        ),
    )
    assert hit is not None and hit.id == stored.id


# ------------------------------------------------------------------------------------ migration

START = datetime(2026, 1, 1, tzinfo=UTC)


def _insert(engine: Engine, table: Table, values: dict[str, Any]) -> int:
    with engine.begin() as connection:
        return int(connection.execute(insert(table).returning(table.c.id), values).scalar_one())


def _seed_duplicates_at_0001(engine: Engine) -> dict[str, Any]:
    """Rows the 0001 schema allowed: the same plan stored twice (the younger first, so that ids
    and age disagree), another plan, and three complete probes of one cache key."""
    tables = MetaData()
    tables.reflect(engine)
    probes, plans, waiters, jobs = (
        tables.tables[n] for n in ("probe_results", "plans", "job_waiters", "jobs")
    )
    workload = gpt2_workload()

    probe_ids = []
    for minutes, size in ((5, 50), (1, 51), (9, 52)):  # the second inserted is the oldest
        values = _probe_values(
            probe_result(workload=workload, max_batch_size=size).model_copy(
                update={"created_at": START + timedelta(minutes=minutes)}
            )
        )
        values["allocator_conf"] = values.pop("alloc_conf") or None  # its 0001 name
        probe_ids.append(_insert(engine, probes, values))

    request = plan_request(workload)
    stored = plan(workload=workload, probe_id=probe_ids[1])

    def plan_values(minutes: int, request: dict[str, Any]) -> dict[str, Any]:
        values = _plan_values(
            stored.model_copy(update={"created_at": START + timedelta(minutes=minutes)}), request
        )
        del values["request_hash"]  # not a 0001 column
        return values

    younger = _insert(engine, plans, plan_values(7, request))
    oldest = _insert(engine, plans, plan_values(3, request))
    other_request = plan_request(workload, effective_batch_size=256)
    other = _insert(engine, plans, plan_values(4, other_request))

    job_values = {
        "key": "k",
        "payload": {},
        "backend": "cuda",
        "status": "succeeded",
        "attempts": 1,
        "max_attempts": 1,
        "run_after": START,
        "created_at": START,
        "updated_at": START,
    }
    job = _insert(engine, jobs, job_values)
    waiter_values = {
        "job_id": job,
        "request": request,
        "status": "resolved",
        "plan_id": younger,
        "created_at": START,
    }
    waiter = _insert(engine, waiters, waiter_values)
    return {
        "probe_ids": probe_ids,
        "request": request,
        "other_request": other_request,
        "younger": younger,
        "oldest": oldest,
        "other": other,
        "waiter": waiter,
    }


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migration_0002_backfills_keeps_the_oldest_and_downgrades(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        upgrade_schema(engine, "0001")
        seeded = _seed_duplicates_at_0001(engine)
        probe_ids: list[int] = seeded["probe_ids"]
        oldest_probe = probe_ids[1]

        upgrade_schema(engine, "0002")

        with engine.connect() as connection:
            hashes = dict(connection.execute(select(PlanRow.id, PlanRow.request_hash)).all())
            statuses = dict(connection.execute(select(ProbeRow.id, ProbeRow.status)).all())
        identity = plan_request_hash(seeded["request"], {"off": oldest_probe})
        assert hashes == {
            seeded["oldest"]: identity,
            seeded["younger"]: None,  # kept, readable, but not the identity
            seeded["other"]: plan_request_hash(seeded["other_request"], {"off": oldest_probe}),
        }
        assert statuses == {probe_ids[0]: "superseded", oldest_probe: "complete", probe_ids[2]: "superseded"}
        # What the repository reads and writes is the newest schema's.
        upgrade_schema(engine)
        found = find_plan_by_request(engine, request_hash=identity)
        assert found is not None and found.id == seeded["oldest"]
        assert get_plan(engine, plan_id=seeded["younger"]).micro_batch_size == 32
        hit = find_cached_probe(
            engine,
            ProbeKey(
                fingerprint=gpt2_workload().fingerprint(),
                device_name=H100.name,
                device_memory_bytes=H100.total_memory_bytes,
                backend="cuda",
                torch_minor="2.13",
                gradient_checkpointing=False,
                alloc_conf="expandable_segments:True",
            ),
        )
        assert hit is not None and hit.id == oldest_probe and hit.max_batch_size == 51
        assert get_probe(engine, probe_id=probe_ids[2]).max_batch_size == 52  # superseded, still readable
        # The backfilled identity is the one the repository uses from now on.
        plan_id, created = save_plan_or_existing(
            engine, plan=plan(workload=gpt2_workload(), probe_id=oldest_probe), request=seeded["request"]
        )
        assert (plan_id, created) == (seeded["oldest"], False)
        upgrade_schema(engine, "head")  # the later revisions only add tables: the models then match
        assert _schema_diff(engine) == []

        downgrade_schema(engine, "0001")

        inspector = inspect(engine)
        assert "request_hash" not in {column["name"] for column in inspector.get_columns("plans")}
        indexes = {index["name"]: index for index in inspector.get_indexes("probe_results")}
        assert "uq_probe_results_cache_key" not in indexes
        assert not indexes["ix_probe_results_cache_key"]["unique"]
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM plans").scalar_one() == 3
            assert connection.exec_driver_sql(
                "SELECT DISTINCT status FROM probe_results"
            ).scalars().all() == ["complete"]
            # Dropping the column did not rebuild `plans` (which would null the waiters' plan ids).
            waiter_plan = connection.exec_driver_sql(
                f"SELECT plan_id FROM job_waiters WHERE id = {int(seeded['waiter'])}"
            ).scalar_one()
            assert waiter_plan == seeded["younger"]

        upgrade_schema(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_migration_0003_puts_the_allocator_setting_in_the_key_and_downgrades(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    workload = gpt2_workload()
    key = {
        "fingerprint": workload.fingerprint(),
        "device_name": H100.name,
        "device_memory_bytes": H100.total_memory_bytes,
        "backend": "cuda",
        "torch_minor": "2.13",
        "gradient_checkpointing": False,
    }
    try:
        upgrade_schema(engine, "0002")
        tables = MetaData()
        tables.reflect(engine)
        values = _probe_values(probe_result(workload=workload, alloc_conf="expandable_segments:True"))
        values["allocator_conf"] = values.pop("alloc_conf")
        expandable = _insert(engine, tables.tables["probe_results"], values)

        upgrade_schema(engine, "0003")
        upgrade_schema(engine, "head")  # the later revisions only add tables: the models then match
        assert _schema_diff(engine) == []
        hit = find_cached_probe(engine, ProbeKey(**key, alloc_conf="expandable_segments:True"))
        assert hit is not None and hit.id == expandable and hit.alloc_conf == "expandable_segments:True"
        assert find_cached_probe(engine, ProbeKey(**key)) is None  # the default allocator is another key
        default_result = probe_result(workload=workload, alloc_conf=None, max_batch_size=50)
        default = save_probe(engine, result=default_result)
        assert default != expandable
        assert find_cached_probe(engine, ProbeKey(**key, alloc_conf=None)).id == default  # type: ignore[union-attr]

        downgrade_schema(engine, "0002")
        with engine.connect() as connection:
            rows = dict(connection.exec_driver_sql("SELECT id, allocator_conf FROM probe_results").all())
            statuses = dict(connection.exec_driver_sql("SELECT id, status FROM probe_results").all())
        assert rows == {expandable: "expandable_segments:True", default: None}
        # One old key, two results: the older stays the answer, the younger is superseded.
        assert statuses == {expandable: "complete", default: "superseded"}
        upgrade_schema(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_a_lookup_by_a_text_no_row_can_hold_matches_nothing(database: Database) -> None:
    """PostgreSQL refuses NUL in text; a filter with one is a miss, not a database error."""
    workload = gpt2_workload()
    save_plan(database.engine, plan=plan(workload=workload), request=plan_request(workload))
    assert list_plans(database.engine, limit=5, fingerprint="ab\x00cd") == ([], 0)
    assert list_plans(database.engine, limit=5, model="gpt\x002") == ([], 0)
    miss = find_cached_probe(
        database.engine,
        ProbeKey(
            fingerprint=workload.fingerprint(),
            device_name="H100\x00",
            device_memory_bytes=H100.total_memory_bytes,
            backend="cuda",
            torch_minor="2.13",
            gradient_checkpointing=False,
        ),
    )
    assert miss is None
    assert list_plans(database.engine, limit=5, model="gpt2")[1] == 1
