"""The job watcher of one API process (`api.job_watch`) on real SQLite and PostgreSQL: however
many requests wait on a job, one watch and one query per look; woken by this process, by
PostgreSQL's NOTIFY from other processes, and by its poll when a notification is lost."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from sqlalchemy import Engine, text, update

from api.job_watch import JobWatcher
from storage import repository
from storage.db import count_statements, ensure_schema, make_engine, session_factory
from storage.jobs import JOBS
from tests.integration.storage import processes
from tests.servers import fresh_database, postgres_reachable


@dataclass
class Database:
    url: str
    engine: Engine

    @property
    def postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    if request.param == "postgresql" and not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    with fresh_database(request.param, Path(tmp_path_factory.mktemp("watch")), prefix="tuner_watch") as url:
        engine = make_engine(url)
        ensure_schema(engine)
        yield Database(url, engine)
        engine.dispose()


@pytest.fixture(scope="module")
def probe_id(database: Database) -> int:
    from tests.integration.storage.factories import probe_result

    return repository.save_probe(database.engine, result=probe_result())


def claimed_job(database: Database) -> int:
    """A new job, claimed by worker `w`."""
    job, _ = repository.enqueue_or_join(
        database.engine, key=f"watch-{uuid.uuid4().hex}", payload={}, backend="cuda", max_attempts=1
    )
    claimed = repository.claim_job(database.engine, worker_id="w", lease_seconds=60, requeue_stalled=False)
    assert claimed is not None and claimed.id == job.id
    return job.id


class Watching:
    """A watcher on the database, with what it looked at and why."""

    def __init__(self, database: Database, **options: Any) -> None:
        self.reasons: Counter[str] = Counter()
        self.statements = 0
        engine = make_engine(database.url)  # its own engine, as an API process has

        def counted() -> None:
            self.statements += 1

        count_statements(engine, counted)
        self.engine = engine
        self.watcher = JobWatcher(
            engine,
            session_factory(engine),
            run_sync=anyio.to_thread.run_sync,
            on_check=lambda reason: self.reasons.update([reason]),
            **options,
        )

    async def close(self) -> None:
        await self.watcher.close()
        self.engine.dispose()


def in_another_process(target: Any, *args: Any) -> None:
    """Run `target(*args)` in a spawned process, as a worker on another machine would."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(60)
    assert process.exitcode == 0


def test_many_waiters_share_one_watch_and_hear_of_another_process(database: Database, probe_id: int) -> None:
    job_id = claimed_job(database)
    waiters = 512

    async def scenario() -> None:
        watching = Watching(database)
        watcher = watching.watcher
        try:
            waiting = [asyncio.create_task(watcher.wait(job_id, timeout=60)) for _ in range(waiters)]
            await watcher.listening()
            await asyncio.sleep(0.05)
            assert (watcher.watched_jobs, watcher.waiting_requests) == (1, waiters)
            before, started = watching.statements, time.monotonic()
            await asyncio.sleep(1.5)  # waiting: a few polls on SQLite, nothing on PostgreSQL
            looks = watching.statements - before
            assert looks <= 2 * (1.5 / watcher.poll_seconds + 2), looks  # BEGIN + SELECT per look
            await asyncio.to_thread(
                in_another_process, processes.complete_one, database.url, "w", job_id, probe_id
            )
            ended = await asyncio.gather(*waiting)
            assert {(job.id, job.status) for job in ended if job is not None} == {(job_id, "succeeded")}
            assert len(ended) == waiters and None not in ended
            assert time.monotonic() - started < 30
            assert watcher.watched_jobs == 0 and watcher.waiting_requests == 0
            # SQLite cannot be told by another process: its poll found the end. PostgreSQL was told.
            assert watching.reasons["notify" if database.postgresql else "poll"] >= 1
        finally:
            await watching.close()

    asyncio.run(scenario())


def test_a_job_ended_in_this_process_wakes_its_waiters_without_a_poll(
    database: Database, probe_id: int
) -> None:
    job_id = claimed_job(database)

    async def scenario() -> None:
        watching = Watching(database, poll_seconds=600, listen=False)
        try:
            waiting = asyncio.create_task(watching.watcher.wait(job_id, timeout=60))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await asyncio.to_thread(
                repository.complete_job, database.engine, job_id=job_id, worker_id="w", probe_id=probe_id
            )
            ended = await waiting
            assert ended is not None and ended.status == "succeeded"
            assert time.monotonic() - started < 5
            assert watching.reasons["local"] == 1 and watching.reasons["poll"] == 0
        finally:
            await watching.close()

    asyncio.run(scenario())


def test_a_job_that_ended_before_the_watch_began_is_found_at_once(database: Database, probe_id: int) -> None:
    job_id = claimed_job(database)
    assert repository.complete_job(database.engine, job_id=job_id, worker_id="w", probe_id=probe_id)

    async def scenario() -> None:
        watching = Watching(database, poll_seconds=600, listen=False)
        try:
            ended = await watching.watcher.wait(job_id, timeout=10)
            assert ended is not None and ended.status == "succeeded"
            assert watching.reasons == {"watch": 1}
            # A wait that times out gives None and leaves nothing watched.
            unfinished = claimed_job(database)
            assert await watching.watcher.wait(unfinished, timeout=0.2) is None
            assert watching.watcher.watched_jobs == 0
        finally:
            await watching.close()

    asyncio.run(scenario())


def _end_without_notifying(url: str, job_id: int) -> None:
    """The job's row changes and no notification arrives: what a notification lost on the way
    (a listener reconnecting, a job finished by hand in SQL) looks like to a listener."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(update(JOBS).where(JOBS.c.id == job_id).values(status="succeeded"))
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_lost_notification_is_covered_by_the_poll(database: Database) -> None:
    if not database.postgresql:
        pytest.skip("notifications are PostgreSQL's; on SQLite the poll is the only cross-process path")
    job_id = claimed_job(database)

    async def scenario() -> None:
        watching = Watching(database, poll_seconds=0.5)
        try:
            waiting = asyncio.create_task(watching.watcher.wait(job_id, timeout=60))
            await watching.watcher.listening()
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await asyncio.to_thread(_end_without_notifying, database.url, job_id)
            ended = await waiting
            assert ended is not None and ended.status == "succeeded"
            assert time.monotonic() - started < 10
            assert watching.reasons["notify"] == 0 and watching.reasons["poll"] >= 1
        finally:
            await watching.close()

    asyncio.run(scenario())


@pytest.mark.postgres
def test_a_listener_whose_connection_dies_reconnects_and_looks_again(
    database: Database, probe_id: int
) -> None:
    if not database.postgresql:
        pytest.skip("LISTEN is PostgreSQL's")
    job_id = claimed_job(database)

    async def scenario() -> None:
        # No poll to fall back on: only the re-established LISTEN can find the end.
        watching = Watching(database, poll_seconds=600)
        try:
            waiting = asyncio.create_task(watching.watcher.wait(job_id, timeout=60))
            await watching.watcher.listening()
            with database.engine.begin() as connection:
                killed = connection.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'tuner-listen' AND datname = current_database()"
                    )
                ).scalar_one()
            assert killed == 1
            # Ended by another process while the listener reconnects: its notification may be
            # lost; the look on reconnecting (or the notification, if it came after) finds it.
            await asyncio.to_thread(
                in_another_process, processes.complete_one, database.url, "w", job_id, probe_id
            )
            ended = await waiting
            assert ended is not None and ended.status == "succeeded"
            assert watching.reasons["poll"] == 0 and watching.reasons["local"] == 0
            assert watching.reasons["listening"] >= 2  # the first LISTEN, and the one after
        finally:
            await watching.close()

    asyncio.run(scenario())
