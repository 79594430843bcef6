"""The worker against the real storage on SQLite, with real estimate probes in child processes."""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update

from probes.child import ChildFailed, ChildFailure
from probes.worker import Worker, is_client_fault
from storage import repository
from storage.models import JobRow, ProbeRow, TrialRow, utcnow
from tests.integration.worker.conftest import TEST_DEVICE, Queue, mlp_request, worker_id
from tuner.errors import EstimateError, ModelBuildError, ProbeError

FACTORIES = "tests.integration.e2e.factories"


def make_worker(engine: Engine, tag: str, **overrides: float) -> Worker:
    options: dict[str, float] = {
        "lease_seconds": 30.0,
        "heartbeat_seconds": 0.2,
        "poll_seconds": 0.1,
        "retry_backoff_seconds": 0.0,
        "grace_seconds": 5.0,
    }
    options.update(overrides)
    return Worker(engine, backend="estimate", device=None, worker_id=worker_id(tag), **options)  # type: ignore[arg-type]


def probe_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(ProbeRow)).scalar_one())


def test_errors_the_spec_causes_are_not_retried() -> None:
    assert is_client_fault(ModelBuildError("model.factory raised"))
    assert is_client_fault(EstimateError("the trace hit a data-dependent op"))
    assert not is_client_fault(ProbeError("The estimate probe failed: the child aborted."))
    assert not is_client_fault(
        ChildFailed(ChildFailure("timeout", "did not finish", error_code="estimate_failed"))
    )
    assert not is_client_fault(RuntimeError("database went away"))


def test_an_idle_worker_claims_nothing(queue: Queue) -> None:
    assert make_worker(queue.engine, "idle").run_once() is False


def test_a_cuda_worker_needs_its_gpu(queue: Queue) -> None:
    with pytest.raises(ValueError, match="needs its GPU"):
        Worker(queue.engine, backend="cuda", device=None, worker_id="w")


@pytest.mark.slow
def test_a_job_is_probed_stored_planned_and_completed(queue: Queue) -> None:
    job = queue.enqueue(mlp_request(effective_batch_size=512, checkpointing="off"))
    # Two more ranks: one asking the same (planned once with the first), one another batch.
    assert queue.enqueue(mlp_request(effective_batch_size=512, checkpointing="off")).id == job.id
    assert queue.enqueue(mlp_request(effective_batch_size=256, checkpointing="off")).id == job.id
    worker = make_worker(queue.engine, "one")

    assert worker.run_once() is True

    done = queue.job(job.id)
    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and done.error is None and done.probe_id is not None
    # The heartbeat stored the search's progress while it ran.
    assert done.progress is not None and done.progress["trials"] >= 1
    probe = repository.get_probe(queue.engine, probe_id=done.probe_id)
    assert probe.backend == "estimate" and probe.device.name == TEST_DEVICE["name"]
    assert probe.gradient_checkpointing is False and probe.max_batch_size > 0 and probe.trials
    # The waiting requests got their plans, derived from the stored probe: identical requests
    # the same plan.
    waiter, same, other = repository.list_waiters(queue.engine, job_id=job.id)
    assert {waiter.status, same.status, other.status} == {"resolved"} and waiter.plan_id is not None
    assert same.plan_id == waiter.plan_id and other.plan_id not in (None, waiter.plan_id)
    assert other.plan_id is not None
    assert repository.get_plan(queue.engine, plan_id=other.plan_id).effective_batch_size == 256
    plan = repository.get_plan(queue.engine, plan_id=waiter.plan_id)
    assert plan.micro_batch_size * plan.accumulation_steps == 512
    assert plan.cache_hit is False and plan.probe_id == done.probe_id

    # `auto` needs both choices; the `off` probe is cached, so only `on` is probed.
    second = queue.enqueue(mlp_request(effective_batch_size=512, checkpointing="auto"))
    assert worker.run_once() is True
    assert queue.job(second.id).status == "succeeded"
    with queue.engine.connect() as connection:
        choices = (
            connection.execute(select(ProbeRow.gradient_checkpointing).order_by(ProbeRow.id)).scalars().all()
        )
        trials = connection.execute(select(func.count()).select_from(TrialRow)).scalar_one()
    assert choices == [False, True]
    assert trials == len(probe.trials) + len(repository.get_probe(queue.engine, probe_id=2).trials)


@pytest.mark.slow
def test_a_model_that_does_not_build_fails_at_once(
    queue: Queue, allow_test_factories: None, caplog: pytest.LogCaptureFixture
) -> None:
    job = queue.enqueue(mlp_request(factory=f"{FACTORIES}:raises"), max_attempts=3)
    worker = make_worker(queue.engine, "spec")

    caplog.set_level(logging.INFO, logger="tuner.worker")
    assert worker.run_once() is True
    # The worker's log shows where the model failed to build: the probe child's own frames.
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "the probe child's traceback" in logged
    assert "factories.py" in logged and "in raises" in logged

    failed = queue.job(job.id)
    assert failed.status == "failed" and failed.attempts == 1
    assert failed.error_code == "model_build_failed"
    assert failed.error is not None and "this model definition is broken" in failed.error
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.status == "failed"
    assert probe_count(queue.engine) == 0


@pytest.mark.slow
def test_under_auto_a_choice_the_model_cannot_be_built_with_is_dropped_not_the_plan(
    queue: Queue, allow_test_factories: None
) -> None:
    job = queue.enqueue(mlp_request(factory=f"{FACTORIES}:refuses_checkpointing", checkpointing="auto"))
    worker = make_worker(queue.engine, "auto-drop")

    assert worker.run_once() is True
    done = queue.job(job.id)
    assert done.status == "succeeded", done.error
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.status == "resolved" and waiter.plan_id is not None
    plan = repository.get_plan(queue.engine, plan_id=waiter.plan_id)
    assert plan.gradient_checkpointing is False and set(plan.max_micro_batch_size) == {"off"}
    assert any("Checkpointing on was not considered" in hint for hint in plan.hints)
    assert "does not support activation checkpointing" in " ".join(plan.hints)
    assert probe_count(queue.engine) == 1  # only the choice that could be built was stored

    # A request that asked for checkpointing on still fails, naming why.
    on = queue.enqueue(mlp_request(factory=f"{FACTORIES}:refuses_checkpointing", checkpointing="on"))
    assert worker.run_once() is True
    failed = queue.job(on.id)
    assert failed.status == "failed" and failed.error_code == "model_build_failed"


@pytest.mark.slow
def test_an_aborting_probe_is_retried_then_fails_and_the_worker_lives_on(
    queue: Queue, allow_test_factories: None
) -> None:
    job = queue.enqueue(mlp_request(factory=f"{FACTORIES}:aborts"), max_attempts=2)
    worker = make_worker(queue.engine, "abort")

    assert worker.run_once() is True
    retrying = queue.job(job.id)
    assert retrying.status == "queued" and retrying.attempts == 1
    assert retrying.error is not None and "aborted (SIGABRT)" in retrying.error
    assert retrying.error_code is None  # a crash is the service's failure, whatever it says

    assert worker.run_once() is True
    failed = queue.job(job.id)
    assert failed.status == "failed" and failed.attempts == 2
    assert "aborted (SIGABRT)" in (failed.error or "")
    # The same worker goes on serving: the next job is probed normally.
    healthy = queue.enqueue(mlp_request())
    assert worker.run_once() is True
    assert queue.job(healthy.id).status == "succeeded"


@pytest.mark.slow
def test_a_hanging_probe_is_stopped_by_its_timeout(queue: Queue, allow_test_factories: None) -> None:
    job = queue.enqueue(mlp_request(factory=f"{FACTORIES}:hangs"), max_attempts=1)
    worker = make_worker(queue.engine, "hang", probe_timeout_seconds=3.0)

    started = time.monotonic()
    assert worker.run_once() is True

    failed = queue.job(job.id)
    assert failed.status == "failed"
    assert re.search(r"did not finish within [0-9.]+ s", failed.error or ""), failed.error
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_worker_that_lost_its_lease_drops_its_result(queue: Queue) -> None:
    job = queue.enqueue(mlp_request())
    worker = make_worker(queue.engine, "loser")
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    deadline = time.monotonic() + 30
    while queue.job(job.id).status != "running":
        assert time.monotonic() < deadline, "the job was never claimed"
        time.sleep(0.05)

    # As if the worker had stalled past its lease: the job goes back to the queue.
    assert repository.requeue_expired(queue.engine, now=utcnow() + timedelta(hours=1)) == 1
    thread.join(60)

    assert not thread.is_alive()
    requeued = queue.job(job.id)
    assert requeued.status == "queued" and requeued.worker_id is None
    assert probe_count(queue.engine) == 0  # nothing stored by the worker that lost the job

    # The requeue stamped the job due at the faked "now"; let that hour pass.
    with queue.engine.begin() as connection:
        connection.execute(update(JobRow).where(JobRow.id == job.id).values(run_after=utcnow()))
    assert make_worker(queue.engine, "winner").run_once() is True
    assert queue.job(job.id).status == "succeeded"
    assert probe_count(queue.engine) == 1


def test_a_running_worker_is_live_until_it_stops(queue: Queue) -> None:
    worker = make_worker(queue.engine, "live", heartbeat_seconds=0.1, poll_seconds=0.05)
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not repository.live_workers(queue.engine):
            assert time.monotonic() < deadline, "the worker never announced itself"
            time.sleep(0.05)
        (live,) = repository.live_workers(queue.engine)
        assert (live.worker_id, live.backend, live.device_name) == (worker.worker_id, "estimate", None)
        assert live.accepts(backend="estimate", device_name="Any GPU", device_memory_bytes=1 << 30)
        assert not live.accepts(backend="cuda", device_name=None, device_memory_bytes=None)
        first_seen = live.seen_at
        time.sleep(0.4)
        assert repository.live_workers(queue.engine)[0].seen_at > first_seen  # renewed while idle
    finally:
        worker.stop()
        thread.join(10)
    assert repository.live_workers(queue.engine) == []  # retired on a clean stop


def test_a_worker_that_stops_announcing_expires(queue: Queue) -> None:
    from storage.records import Accepts

    gpu = Accepts(backend="cuda", device_name="NVIDIA H100 80GB HBM3", device_memory_bytes=85017493504)
    repository.announce_worker(queue.engine, worker_id="gpu-node:1", accepts=gpu, ttl_seconds=0.3)
    (live,) = repository.live_workers(queue.engine, backend="cuda")
    assert live.accepts(backend="cuda", device_name=None, device_memory_bytes=None)  # any GPU will do
    assert not live.accepts(backend="cuda", device_name="NVIDIA A100-SXM4-40GB", device_memory_bytes=None)
    time.sleep(0.5)
    assert repository.live_workers(queue.engine) == []  # it died without retiring


@pytest.mark.slow
def test_a_job_of_which_nothing_fits_fails_with_the_reason(queue: Queue) -> None:
    request = mlp_request(effective_batch_size=64)
    request["workload"]["model"]["kwargs"] = {"hidden_dim": 4096, "num_layers": 4}
    request["workload"]["inputs"]["dim"] = 4096
    job = queue.enqueue(request)
    assert make_worker(queue.engine, "nothing-fits").run_once() is True
    done = queue.job(job.id)
    assert done.status == "failed" and done.attempts == 1  # a client fault: no retry
    assert done.error_code == "nothing_fits"
    assert done.error is not None and done.error.startswith("Nothing fits: not even a micro-batch of 1")
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.status == "failed" and (waiter.error, waiter.error_code) == (done.error, done.error_code)
    assert probe_count(queue.engine) == 1  # the probe itself is stored: the next ask is answered from it


@pytest.mark.slow
def test_a_job_stored_by_the_previous_version_is_still_run(queue: Queue) -> None:
    """A payload queued before parallelism and extra probes were part of it (neither key) reads
    as a single process with no extra probes, and its job runs as it did."""
    from storage.planning import canonical_request, installed_torch_minor, job_key, job_payload
    from tuner.spec import parse_plan_request

    request = parse_plan_request(mlp_request(effective_batch_size=128, checkpointing="off"))
    minor = installed_torch_minor()
    old_shape = {
        key: value
        for key, value in job_payload(request, minor).stored().items()
        if key not in ("parallel", "extra_probes")
    }
    assert set(old_shape) == {
        "workload",
        "device",
        "backend",
        "gradient_checkpointing",
        "torch_minor",
        "alloc_conf",
    }
    job, _ = repository.enqueue_or_join(
        queue.engine,
        key=job_key(request, minor),
        payload=old_shape,
        max_attempts=1,
        waiter=canonical_request(request),
    )
    assert make_worker(queue.engine, "old-shape").run_once() is True
    done = queue.job(job.id)
    assert done.status == "succeeded", done.error
    probe = repository.get_probe(queue.engine, probe_id=done.probe_id)  # type: ignore[arg-type]
    assert probe.parallelism == "" and probe.max_batch_size > 0
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.status == "resolved" and waiter.plan_id is not None


def test_a_job_that_names_no_device_fails_its_waiters_as_the_clients_fault(queue: Queue) -> None:
    from api.errors import status_for
    from api.plan_service import job_error, job_out
    from storage.planning import installed_torch_minor, job_key, job_payload
    from tuner.client import Job, _job_failure
    from tuner.spec import parse_plan_request

    # An estimate job without a device (the API refuses such requests; an older or foreign
    # producer may still queue one): the worker has no device to offer, the request is at fault.
    request = parse_plan_request(mlp_request())
    minor = installed_torch_minor()
    job, _ = repository.enqueue_or_join(
        queue.engine,
        key=job_key(request, minor) + "|no-device",
        payload={**job_payload(request, minor).stored(), "device": None},
        max_attempts=3,
        waiter=request.model_dump(mode="json"),
    )
    assert make_worker(queue.engine, "no-device").run_once() is True
    failed = queue.job(job.id)
    assert (failed.status, failed.attempts, failed.error_code) == ("failed", 1, "device_required")
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert (waiter.status, waiter.error_code) == ("failed", "device_required")
    # What a waiter is answered: `POST /v1/plans?wait=` and `TunerClient` both give a 422.
    error = job_error(failed)
    assert (error.code, status_for(error)) == ("device_required", 422)
    client_error = _job_failure(Job.model_validate(job_out(failed, None).model_dump(mode="json")))
    assert (client_error.code, client_error.status_code) == ("device_required", 422)
    assert "names no device" in client_error.message


def test_a_service_failure_that_reads_like_a_code_stays_the_services(queue: Queue) -> None:
    from api.errors import status_for
    from api.plan_service import job_error

    # The sentence of a failure is not parsed for a code: only `error_code` says whose fault it is.
    job = queue.enqueue(mlp_request(), max_attempts=1)
    claimed = repository.claim_job(
        queue.engine, worker_id="w", lease_seconds=30, accepts=repository.Accepts(backend="estimate")
    )
    assert claimed is not None and claimed.id == job.id
    repository.fail_job(
        queue.engine,
        job_id=job.id,
        worker_id="w",
        error="nothing_fits: the text of a crash that happens to start like a code",
        retry_backoff_seconds=0,
    )
    failed = queue.job(job.id)
    assert failed.status == "failed" and failed.error_code is None
    error = job_error(failed)
    assert (error.code, status_for(error)) == ("probe_failed", 503)


@pytest.mark.slow
def test_a_capped_request_is_planned_within_its_cap_from_the_shared_probe(queue: Queue) -> None:
    from storage.db import session_factory
    from storage.planning import derive_plan, installed_torch_minor
    from tuner.spec import parse_plan_request

    # The worker's probe answers every request of its key, so its search is not cut at one
    # request's `max_micro_batch_size` (a later request without the cap would be planned from
    # it); the cap applies to the plan each request gets.
    capped = mlp_request(effective_batch_size=512)
    capped["policy"]["max_micro_batch_size"] = 8
    job = queue.enqueue(capped)
    assert make_worker(queue.engine, "capped").run_once() is True
    done = queue.job(job.id)
    assert done.status == "succeeded", done.error
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.plan_id is not None
    plan = repository.get_plan(queue.engine, plan_id=waiter.plan_id)
    assert plan.micro_batch_size <= 8 and plan.micro_batch_size * plan.accumulation_steps == 512
    probe = repository.get_probe(queue.engine, probe_id=done.probe_id)  # type: ignore[arg-type]
    assert probe.max_batch_size > 8
    uncapped = parse_plan_request(mlp_request(effective_batch_size=512))
    with session_factory(queue.engine)() as session:
        free = derive_plan(session, request=uncapped, torch_minor=installed_torch_minor())
    assert free is not None and free.micro_batch_size > 8 and free.probe_id == probe.id
