"""The job queue under concurrency, lost workers and failures: the same bodies on SQLite and
PostgreSQL, with real threads and real (spawned, then SIGKILLed) processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from storage.models import JobRow
from storage.planning import job_key
from storage.repository import (
    LEASE_EXPIRED_ERROR,
    Accepts,
    add_waiter,
    claim_job,
    complete_job,
    enqueue_or_join,
    fail_job,
    fail_waiter,
    get_job,
    get_waiter,
    heartbeat,
    job_counts,
    list_jobs,
    list_waiters,
    queue_depth,
    release_job,
    requeue_expired,
    resolve_waiter,
    save_plan,
    save_probe,
)
from tests.integration.storage import processes
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import A100, H100, gpt2_workload, plan, plan_request, probe_result
from tuner.errors import ConflictError
from tuner.spec import parse_plan_request

LEASE = 2.0
"""Short leases keep the lost-worker tests fast; long enough that a loaded machine (three test
workers on two cores) still finishes the steps meant to happen inside one."""


def _probe_id(database: Database) -> int:
    with database.sessions() as session:
        return save_probe(session, result=probe_result())


def _enqueue(database: Database, count: int, **extra: object) -> list[int]:
    ids = []
    with database.sessions() as session:
        for index in range(count):
            job, created = enqueue_or_join(
                session, key=f"key-{index}", payload={"n": index}, backend="cuda", max_attempts=3, **extra
            )
            assert created
            ids.append(job.id)
    return ids


def _wait_for_lease_to_expire() -> None:
    time.sleep(LEASE + 0.2)


# ------------------------------------------------------------------------------------- enqueue


def test_concurrent_enqueue_or_join_for_one_key_makes_one_job(database: Database) -> None:
    callers = 20
    barrier = threading.Barrier(callers)
    outcomes: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            with database.sessions() as session:
                barrier.wait(timeout=30)
                job, created = enqueue_or_join(
                    session,
                    key="gpt2-on-h100",
                    payload={"who": index},
                    backend="cuda",
                    max_attempts=3,
                    waiter={"request": index},
                )
                outcomes.append((job.id, created))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(outcomes) == callers
    assert len({job_id for job_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    job_id = outcomes[0][0]
    with database.sessions() as session:
        assert session.execute(select(func.count()).select_from(JobRow)).scalar_one() == 1
        waiters = list_waiters(session, job_id=job_id)
    # Every caller waits on the one job: no request is dropped.
    assert sorted(w.request["request"] for w in waiters) == list(range(callers))


def test_a_finished_job_is_not_joined_and_takes_no_waiters(database: Database) -> None:
    probe_id = _probe_id(database)
    with database.sessions() as session:
        first, created = enqueue_or_join(session, key="k", payload={}, backend="estimate", max_attempts=1)
        assert created
        claimed = claim_job(session, worker_id="w", lease_seconds=30)
        assert claimed is not None and claimed.id == first.id
        # Joined while running.
        joined, created = enqueue_or_join(session, key="k", payload={}, backend="estimate", max_attempts=1)
        assert joined.id == first.id and not created
        assert complete_job(session, job_id=first.id, worker_id="w", probe_id=probe_id)
        with pytest.raises(ConflictError, match="has already succeeded"):
            add_waiter(session, job_id=first.id, request={"late": True})
        second, created = enqueue_or_join(session, key="k", payload={}, backend="estimate", max_attempts=1)
        assert created and second.id != first.id


def test_enqueue_reads_backend_and_device_from_a_plan_request_payload(database: Database) -> None:
    workload = gpt2_workload()
    key = job_key(parse_plan_request(plan_request(workload)), "2.13")
    with database.sessions() as session:
        job, _ = enqueue_or_join(session, key=key, payload=plan_request(workload), max_attempts=2)
    assert (job.backend, job.device_name, job.device_memory_bytes) == (
        "cuda",
        H100.name,
        H100.total_memory_bytes,
    )
    assert job.status == "queued" and job.attempts == 0 and job.max_attempts == 2


# --------------------------------------------------------------------------------------- claims


def test_eight_threads_claim_a_hundred_jobs_each_exactly_once(database: Database) -> None:
    job_ids = _enqueue(database, 100)
    probe_id = _probe_id(database)
    claims: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(worker_id: str) -> None:
        mine: list[int] = []
        claims[worker_id] = mine
        try:
            barrier.wait(timeout=30)
            with database.sessions() as session:
                while (job := claim_job(session, worker_id=worker_id, lease_seconds=60)) is not None:
                    mine.append(job.id)
                    time.sleep(0.002)
                    assert complete_job(session, job_id=job.id, worker_id=worker_id, probe_id=probe_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"thread-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    every_claim = [job_id for mine in claims.values() for job_id in mine]
    assert Counter(every_claim) == Counter(job_ids)  # each job exactly once
    assert sum(1 for mine in claims.values() if mine) > 1  # the workers did run side by side
    with database.sessions() as session:
        assert job_counts(session) == {"queued": 0, "running": 0, "succeeded": 100, "failed": 0}
        assert {job.attempts for job in list_jobs(session, limit=200)} == {1}


@pytest.mark.slow
def test_eight_processes_claim_a_hundred_jobs_each_exactly_once(database: Database) -> None:
    job_ids = _enqueue(database, 100)
    probe_id = _probe_id(database)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    results = context.Queue()
    workers = [
        context.Process(
            target=processes.claim_until_empty,
            args=(database.url, f"process-{i}", probe_id, start, results),
        )
        for i in range(8)
    ]
    for worker in workers:
        worker.start()
    start.set()
    claims = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    every_claim = [job_id for mine in claims.values() for job_id in mine]
    assert Counter(every_claim) == Counter(job_ids)
    with database.sessions() as session:
        assert job_counts(session)["succeeded"] == 100
        assert {job.worker_id for job in list_jobs(session, limit=200)} == {
            worker_id for worker_id, mine in claims.items() if mine
        }


def test_claims_respect_the_device_filter_and_backoff(database: Database) -> None:
    with database.sessions() as session:
        on_h100, _ = enqueue_or_join(
            session,
            key="h100",
            payload={},
            backend="cuda",
            device_name=H100.name,
            device_memory_bytes=H100.total_memory_bytes,
            max_attempts=1,
        )
        any_gpu, _ = enqueue_or_join(session, key="any", payload={}, backend="cuda", max_attempts=1)
        estimate, _ = enqueue_or_join(
            session, key="est", payload={}, backend="estimate", device_name=A100.name, max_attempts=1
        )
        a100_worker = Accepts(
            backend="cuda", device_name=A100.name, device_memory_bytes=A100.total_memory_bytes
        )
        claimed = claim_job(session, worker_id="a100", lease_seconds=30, accepts=a100_worker)
        assert claimed is not None and claimed.id == any_gpu.id  # a job naming no device
        assert claim_job(session, worker_id="a100", lease_seconds=30, accepts=a100_worker) is None
        h100_worker = Accepts(
            backend="cuda", device_name=H100.name, device_memory_bytes=H100.total_memory_bytes
        )
        claimed = claim_job(session, worker_id="h100", lease_seconds=30, accepts=[h100_worker])
        assert claimed is not None and claimed.id == on_h100.id
        claimed = claim_job(session, worker_id="cpu", lease_seconds=30, accepts=Accepts(backend="estimate"))
        assert claimed is not None and claimed.id == estimate.id
        assert queue_depth(session) == 0


# ---------------------------------------------------------------------------- lost workers


def test_a_worker_that_stops_heartbeating_loses_the_job_to_another(database: Database) -> None:
    probe_id = _probe_id(database)
    [job_id] = _enqueue(database, 1)
    with database.sessions() as session:
        first = claim_job(session, worker_id="first", lease_seconds=LEASE)
        assert first is not None and first.id == job_id and first.attempts == 1
        assert heartbeat(
            session, job_id=job_id, worker_id="first", lease_seconds=LEASE, progress={"trials": 2}
        )
        assert get_job(session, job_id=job_id).progress == {"trials": 2}
        # Held under a live lease: nobody else gets it.
        assert claim_job(session, worker_id="second", lease_seconds=LEASE) is None

        _wait_for_lease_to_expire()  # "first" stops heart-beating
        second = claim_job(session, worker_id="second", lease_seconds=30)
        assert second is not None and second.id == job_id
        assert second.attempts == 2 and second.error == LEASE_EXPIRED_ERROR

        # The first worker wakes up: its lease is gone, and so is its right to finish.
        assert not heartbeat(session, job_id=job_id, worker_id="first", lease_seconds=LEASE)
        assert not complete_job(session, job_id=job_id, worker_id="first", probe_id=probe_id)
        assert complete_job(session, job_id=job_id, worker_id="second", probe_id=probe_id)
        done = get_job(session, job_id=job_id)
    assert (done.status, done.worker_id, done.probe_id, done.error) == ("succeeded", "second", probe_id, None)
    assert done.finished_at is not None and done.lease_until is None


def test_requeue_expired_touches_only_expired_leases(database: Database) -> None:
    _enqueue(database, 3)
    with database.sessions() as session:
        short = claim_job(session, worker_id="a", lease_seconds=10)
        long = claim_job(session, worker_id="b", lease_seconds=100)
        assert short is not None and long is not None
        assert requeue_expired(session) == 0
        later = short.lease_until + timedelta(seconds=1)  # type: ignore[operator]
        assert requeue_expired(session, now=later) == 1
        assert get_job(session, job_id=short.id).status == "queued"
        assert get_job(session, job_id=long.id).status == "running"
        assert queue_depth(session) == 2


def test_a_job_failing_every_attempt_ends_failed_with_its_last_error(database: Database) -> None:
    with database.sessions() as session:
        job, _ = enqueue_or_join(
            session, key="doomed", payload={}, backend="cuda", max_attempts=3, waiter={"plan": 1}
        )
        # Long enough that "not claimable while backing off" is checked well inside the back-off
        # on a loaded machine; the claims then wait it out.
        backoff = 1.0
        for attempt in range(1, 4):
            claimed = None
            deadline = time.monotonic() + 10
            while claimed is None and time.monotonic() < deadline:
                claimed = claim_job(session, worker_id="w", lease_seconds=30)
            assert claimed is not None and claimed.attempts == attempt
            failed = fail_job(
                session, job_id=job.id, worker_id="w", error=f"boom {attempt}", retry_backoff_seconds=backoff
            )
            assert failed is not None and failed.error == f"boom {attempt}"
            if attempt < 3:
                assert failed.status == "queued"
                delay = (failed.run_after - failed.updated_at).total_seconds()
                assert delay == pytest.approx(backoff * 2 ** (attempt - 1), abs=0.01)
                # Not claimable while backing off.
                if datetime.now(UTC) < failed.run_after - timedelta(seconds=0.5):
                    assert claim_job(session, worker_id="w", lease_seconds=30) is None
        final = get_job(session, job_id=job.id)
        [waiter] = list_waiters(session, job_id=job.id)
    assert (final.status, final.attempts, final.error) == ("failed", 3, "boom 3")
    assert final.finished_at is not None and final.worker_id is None
    assert (waiter.status, waiter.error) == ("failed", "boom 3")


def test_an_error_that_retrying_cannot_fix_fails_at_once(database: Database) -> None:
    [job_id] = _enqueue(database, 1)
    with database.sessions() as session:
        assert claim_job(session, worker_id="w", lease_seconds=30) is not None
        failed = fail_job(
            session,
            job_id=job_id,
            worker_id="w",
            error="unknown model_type",
            retry_backoff_seconds=1,
            retry=False,
        )
    assert failed is not None and (failed.status, failed.attempts) == ("failed", 1)


def test_a_job_whose_every_worker_dies_ends_failed(database: Database) -> None:
    with database.sessions() as session:
        job, _ = enqueue_or_join(session, key="poison", payload={}, backend="cuda", max_attempts=2)
        for _ in range(2):
            assert claim_job(session, worker_id="w", lease_seconds=LEASE) is not None
            _wait_for_lease_to_expire()
        assert requeue_expired(session) == 1
        final = get_job(session, job_id=job.id)
    assert (final.status, final.attempts, final.error) == ("failed", 2, LEASE_EXPIRED_ERROR)


def test_a_released_job_goes_back_without_counting_the_attempt(database: Database) -> None:
    [job_id] = _enqueue(database, 1)
    with database.sessions() as session:
        assert claim_job(session, worker_id="w", lease_seconds=30) is not None
        assert release_job(session, job_id=job_id, worker_id="w")
        assert not release_job(session, job_id=job_id, worker_id="w")
        released = get_job(session, job_id=job_id)
        assert (released.status, released.attempts, released.worker_id) == ("queued", 0, None)
        again = claim_job(session, worker_id="other", lease_seconds=30)
    assert again is not None and again.id == job_id and again.attempts == 1


@pytest.mark.slow
def test_a_process_killed_between_claim_and_complete_loses_no_job(database: Database) -> None:
    probe_id = _probe_id(database)
    job_ids = _enqueue(database, 3)
    context = multiprocessing.get_context("spawn")
    claimed = context.Queue()
    doomed = context.Process(target=processes.claim_and_hang, args=(database.url, "doomed", LEASE, claimed))
    doomed.start()
    try:
        job_id = claimed.get(timeout=60)
        assert job_id == job_ids[0]
        with database.sessions() as session:
            assert get_job(session, job_id=job_id).progress == {"trials": 1}
    finally:
        assert doomed.pid is not None
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(timeout=30)
    assert doomed.exitcode == -signal.SIGKILL

    _wait_for_lease_to_expire()
    finished: list[int] = []
    with database.sessions() as session:
        while (job := claim_job(session, worker_id="survivor", lease_seconds=30)) is not None:
            assert complete_job(session, job_id=job.id, worker_id="survivor", probe_id=probe_id)
            finished.append(job.id)
        assert sorted(finished) == job_ids
        assert get_job(session, job_id=job_id).attempts == 2
        assert job_counts(session) == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0}


# -------------------------------------------------------------------------------------- waiters


def test_waiters_resolve_once_to_one_plan(database: Database) -> None:
    workload = gpt2_workload()
    probe_id = _probe_id(database)
    request = plan_request(workload)
    with database.sessions() as session:
        job, _ = enqueue_or_join(session, key="k", payload=request, max_attempts=1, waiter=request)
        second = add_waiter(session, job_id=job.id, request={**request, "effective_batch_size": 256})
        assert claim_job(session, worker_id="w", lease_seconds=30) is not None
        assert complete_job(session, job_id=job.id, worker_id="w", probe_id=probe_id)
        pending = list_waiters(session, job_id=job.id, pending_only=True)
        assert [w.id for w in pending][1] == second
        first_plan = save_plan(
            session, plan=plan(workload=workload), request=pending[0].request, waiter_id=pending[0].id
        )
        # Derived twice (two processes raced): the waiter keeps its first plan; no duplicate row.
        again = save_plan(
            session, plan=plan(workload=workload), request=pending[0].request, waiter_id=pending[0].id
        )
        assert again == first_plan
        waiters = list_waiters(session, job_id=job.id)
        assert [(w.status, w.plan_id) for w in waiters] == [("resolved", first_plan), ("pending", None)]
        assert [w.id for w in list_waiters(session, job_id=job.id, pending_only=True)] == [second]

        # An identical request's plan can resolve a waiter; a resolved waiter cannot then fail.
        assert resolve_waiter(session, waiter_id=second, plan_id=first_plan)
        assert not resolve_waiter(session, waiter_id=second, plan_id=first_plan)
        assert not fail_waiter(session, waiter_id=second, error="late")
        assert get_waiter(session, waiter_id=second).plan_id == first_plan
