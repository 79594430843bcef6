"""A job's end is signalled by the transaction that ends it: to this process's subscribers after
the commit (both databases) and to PostgreSQL listeners at the commit (`LISTEN/NOTIFY`), never
for a write that did not end the job."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from storage.job_events import listen_finished, subscribe_finished
from storage.repository import (
    claim_job,
    complete_job,
    enqueue_or_join,
    enqueue_waiters,
    fail_job,
    finished_jobs,
    heartbeat,
    list_waiters,
    requeue_expired,
    resolve_waiters,
    save_plan,
    save_probe,
)
from tests.integration.storage import processes
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import gpt2_workload, plan, plan_request, probe_result


class Heard:
    """The job ids this process's subscribers heard, in order."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, job_ids: Sequence[int]) -> None:
        with self._lock:
            self.ids.extend(job_ids)


@pytest.fixture
def heard() -> Iterator[Heard]:
    listener = Heard()
    unsubscribe = subscribe_finished(listener)
    yield listener
    unsubscribe()


def _claimed_job(database: Database, key: str, *, max_attempts: int = 3, lease: float = 30) -> int:
    with database.sessions() as session:
        job, _ = enqueue_or_join(session, key=key, payload={}, backend="cuda", max_attempts=max_attempts)
        claimed = claim_job(session, worker_id="w", lease_seconds=lease)
    assert claimed is not None and claimed.id == job.id
    return job.id


def test_the_transactions_that_end_a_job_tell_this_process(database: Database, heard: Heard) -> None:
    probe_id = save_probe(database.engine, result=probe_result())
    succeeded = _claimed_job(database, "succeeds")
    # Renewing the lease, or a completion by a worker that does not hold the job, ends nothing.
    assert heartbeat(database.engine, job_id=succeeded, worker_id="w", lease_seconds=30)
    assert not complete_job(database.engine, job_id=succeeded, worker_id="other", probe_id=probe_id)
    assert heard.ids == []
    assert complete_job(database.engine, job_id=succeeded, worker_id="w", probe_id=probe_id)
    assert heard.ids == [succeeded]

    retried = _claimed_job(database, "retried", max_attempts=2)
    failed = fail_job(database.engine, job_id=retried, worker_id="w", error="boom", retry_backoff_seconds=0)
    assert failed is not None and failed.status == "queued"
    assert heard.ids == [succeeded]  # back in the queue: not ended
    assert claim_job(database.engine, worker_id="w", lease_seconds=30) is not None
    failed = fail_job(database.engine, job_id=retried, worker_id="w", error="boom", retry_backoff_seconds=0)
    assert failed is not None and failed.status == "failed"
    assert heard.ids == [succeeded, retried]

    abandoned = _claimed_job(database, "abandoned", max_attempts=1, lease=0.2)
    time.sleep(0.4)
    assert requeue_expired(database.engine) == 1
    assert heard.ids == [succeeded, retried, abandoned]
    ended = finished_jobs(database.engine, job_ids=[succeeded, retried, abandoned, 999])
    assert sorted((job.id, job.status) for job in ended) == [
        (succeeded, "succeeded"),
        (retried, "failed"),
        (abandoned, "failed"),
    ]


def test_a_herd_of_waiters_is_stored_in_one_go_and_resolved_once(database: Database) -> None:
    workload = gpt2_workload()
    request = plan_request(workload)
    job, created, waiter_ids = enqueue_waiters(
        database.engine, key="herd", payload=request, max_attempts=1, requests=[request] * 50
    )
    assert created and len(set(waiter_ids)) == 50
    again, created, more = enqueue_waiters(
        database.engine, key="herd", payload=request, max_attempts=1, requests=[request] * 3
    )
    assert again.id == job.id and not created and min(more) > max(waiter_ids)
    assert [w.id for w in list_waiters(database.engine, job_id=job.id)] == waiter_ids + more

    plan_id = save_plan(
        database.engine, plan=plan(workload=workload), request=request, waiter_id=waiter_ids[0]
    )
    # The first resolution wins; a second one (another process deriving too) changes nothing.
    assert resolve_waiters(database.engine, waiter_ids=waiter_ids + more, plan_id=plan_id) == 52
    assert resolve_waiters(database.engine, waiter_ids=waiter_ids + more, plan_id=plan_id) == 0
    waiters = list_waiters(database.engine, job_id=job.id)
    assert {(w.status, w.plan_id) for w in waiters} == {("resolved", plan_id)} and len(waiters) == 53


@pytest.mark.postgres
def test_postgresql_listeners_hear_an_end_committed_by_another_process(database: Database) -> None:
    if database.backend != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    probe_id = save_probe(database.engine, result=probe_result())
    first = _claimed_job(database, "first")
    second = _claimed_job(database, "second")

    async def listen() -> list[int]:
        ready = asyncio.Event()
        heard: list[int] = []

        async def collect() -> None:
            async for job_id in listen_finished(database.engine, on_listening=ready.set):
                heard.append(job_id)
                if len(heard) == 2:
                    return

        listening = asyncio.create_task(collect())
        await asyncio.wait_for(ready.wait(), 30)
        # A worker process ends both jobs; one of them the way a failure does.
        context = multiprocessing.get_context("spawn")
        worker = context.Process(target=processes.end_jobs, args=(database.url, "w", first, second, probe_id))
        worker.start()
        await asyncio.wait_for(listening, 60)
        worker.join(30)
        assert worker.exitcode == 0
        return heard

    assert asyncio.run(listen()) == [first, second]
