"""TunerClient over real HTTP against the real service: the API under uvicorn, a real worker, a
real database (SQLite; PostgreSQL for the outage tests)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import repository
from storage.records import Accepts
from tests.integration.api.seeding import TORCH_VERSION, mlp_workload, plan_request, seed_probes
from tests.servers import (
    API_APP,
    PostgresAdmin,
    ServerProcess,
    clean_env,
    free_port,
    launch,
    postgres_reachable,
    running_api_server,
    stop_process,
    uvicorn_command,
)
from tests.training.conftest import Service, unique_number
from tuner.client import Job, TunerClient, _parse
from tuner.errors import ServiceError
from tuner.results import Plan, ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanRequest, WorkloadSpec, parse_plan_request

DEVICE = DeviceSpec(name="Test GPU 2GiB", total_memory_bytes=2 << 30)


def fresh_workload() -> WorkloadSpec:
    """A tiny MLP no other test plans for (its hidden width is this test's own)."""
    return mlp_workload(hidden_dim=16 + unique_number())


def unserved_device() -> DeviceSpec:
    """A GPU no worker of the service has: `cuda` jobs for it are refused, or, queued on purpose
    (`queue_without_worker`, a fleet whose GPU workers start later), stay queued."""
    return DeviceSpec(name=f"Unserved GPU {unique_number()}", total_memory_bytes=1 << 30)


def request_for(
    workload: WorkloadSpec,
    effective_batch_size: int = 48,
    *,
    device: DeviceSpec = DEVICE,
    backend: str = "estimate",
) -> PlanRequest:
    return parse_plan_request(
        plan_request(
            workload,
            effective_batch_size=effective_batch_size,
            device=device,
            backend=backend,
            checkpointing="off",
        )
    )


def fast_client(service: Service, **kwargs: object) -> TunerClient:
    options: dict[str, object] = {"token": service.token, "backoff": 0.01, "poll_interval": 0.05, **kwargs}
    return TunerClient(service.url, **options)  # type: ignore[arg-type]


def test_create_plan_follows_the_202_job_to_the_plan_then_hits_the_cache(service: Service) -> None:
    workload = fresh_workload()
    with fast_client(service) as client:
        seen: list[str] = []
        submitted = client.submit_plan(request_for(workload))
        assert isinstance(submitted, Job) and submitted.status == "queued"
        job = client.wait_for_job(submitted, max_seconds=120, on_update=lambda j: seen.append(j.status))
        assert seen[0] == "queued" and "running" in seen and seen[-1] == "succeeded"
        plan = client.get_plan(job.plan_id)  # type: ignore[arg-type]
        assert plan.micro_batch_size * plan.accumulation_steps == 48
        assert plan.fingerprint == workload.fingerprint() and not plan.cache_hit
        assert plan.backend == "estimate" and plan.probe_id is not None

        again = client.create_plan(request_for(workload), progress=False)
        assert again.cache_hit and again.id == plan.id
        assert isinstance(client.submit_plan(request_for(workload)), Plan)

        # A new effective batch on the probed workload is derived at once, without a job.
        fresh = client.create_plan(request_for(workload, 96), wait=1, progress=True)
        assert fresh.effective_batch_size == 96 and fresh.id != plan.id and fresh.probe_id == plan.probe_id


def test_a_failed_job_raises_with_the_servers_reason(service: Service) -> None:
    device = unserved_device()
    with fast_client(service) as client:
        submitted = client.submit_plan(
            request_for(fresh_workload(), device=device, backend="cuda"), queue_without_worker=True
        )
        assert isinstance(submitted, Job)
        # A GPU worker for this device claims the job and its probe child crashes for good.
        claimed = repository.claim_job(
            service.engine,
            worker_id="gpu-node:test",
            lease_seconds=60,
            accepts=Accepts(backend="cuda", device_name=device.name),
        )
        assert claimed is not None and claimed.id == submitted.id
        failed = repository.fail_job(
            service.engine,
            job_id=claimed.id,
            worker_id="gpu-node:test",
            error="The probe child crashed (SIGSEGV) before returning a result.",
            retry_backoff_seconds=0,
            retry=False,
        )
        assert failed is not None and failed.status == "failed"
        with pytest.raises(ServiceError) as caught:
            client.wait_for_job(submitted, max_seconds=30)
    assert caught.value.code == "probe_failed" and caught.value.status_code == 503
    assert "SIGSEGV" in caught.value.message and "1 attempt(s)" in caught.value.message


def test_the_wait_reaches_the_server_and_polling_gives_up_after_max_seconds(service: Service) -> None:
    queued = request_for(fresh_workload(), device=unserved_device(), backend="cuda")
    with fast_client(service) as client:
        with pytest.raises(ServiceError) as refused:
            client.submit_plan(queued, wait=0)
        assert (refused.value.code, refused.value.status_code) == ("no_worker", 409)
        assert "a cuda worker on Unserved GPU" in refused.value.message
        first = client.submit_plan(queued, wait=0, queue_without_worker=True)
        assert isinstance(first, Job)
        started = time.monotonic()
        # the server holds it a second, then answers 202
        held = client.submit_plan(queued, wait=1, queue_without_worker=True)
        assert isinstance(held, Job) and held.id == first.id and time.monotonic() - started >= 1.0
        started = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            client.create_plan(queued, max_seconds=0.5, progress=True, queue_without_worker=True)
    assert caught.value.code == "job_timeout" and "still queued" in caught.value.message
    assert 0.3 <= time.monotonic() - started < 5


def test_server_errors_carry_detail_code_and_status(service: Service) -> None:
    with fast_client(service) as client:
        with pytest.raises(ServiceError) as caught:
            client.get_plan(424242)
        assert (caught.value.status_code, caught.value.code) == (404, "not_found")
        assert caught.value.message == "No plan with id 424242."
        with pytest.raises(ServiceError) as caught:
            client.get_job(10**9)
        assert caught.value.status_code == 404


def test_writes_need_the_token_and_the_client_sends_it(service: Service) -> None:
    request = request_for(fresh_workload(), device=unserved_device(), backend="cuda")
    with TunerClient(service.url) as anonymous, pytest.raises(ServiceError) as caught:
        anonymous.submit_plan(request)
    assert (caught.value.status_code, caught.value.code) == (401, "unauthorized")
    with TunerClient(service.url, token="not-the-token") as wrong, pytest.raises(ServiceError) as caught:
        wrong.submit_plan(request)
    assert caught.value.status_code == 401
    with TunerClient(service.url, token=service.token) as client:
        assert isinstance(client.submit_plan(request, queue_without_worker=True), Job)
        assert client.health()["status"] == "ok"  # reads need no token


def test_list_plans_filters_and_pages(service: Service) -> None:
    workload = fresh_workload()
    seed_probes(service.engine, workload)  # measured already: each plan below is derived at once
    fingerprint = workload.fingerprint()
    with fast_client(service) as client:
        ids = [client.create_plan(request_for(workload, b), progress=False).id for b in (16, 32, 64)]
        page = client.list_plans(limit=2, fingerprint=fingerprint)
        assert page.total == 3 and [p.id for p in page.items] == ids[::-1][:2]
        assert [p.id for p in client.list_plans(limit=2, offset=2, fingerprint=fingerprint).items] == ids[:1]
        assert client.list_plans(fingerprint=fingerprint, device_name=DEVICE.name, model="mlp").total == 3
        assert client.list_plans(fingerprint=fingerprint, device_name="NVIDIA A100-SXM4-40GB").total == 0
        assert client.list_plans(device_name=DEVICE.name).total >= 3


def test_upload_probe_returns_it_with_an_id_and_get_probe_reads_it_back(service: Service) -> None:
    workload = fresh_workload()
    probe = ProbeResult(
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504),
        backend="cuda",
        gradient_checkpointing=False,
        max_batch_size=37,
        trials=[Trial(32, True, 1 << 30, 5 << 29, 0.5), Trial(38, False, error="out_of_memory")],
        memory_line=MemoryLine(1e9, 2e7),
        versions={"torch": TORCH_VERSION},  # the server files probes under the torch minor
    )
    with fast_client(service) as client:
        stored = client.upload_probe(probe)
        assert stored.id is not None and stored.created_at is not None
        again = client.get_probe(stored.id)
        with pytest.raises(ServiceError) as caught:
            client.get_probe(10**9)
        assert caught.value.status_code == 404
    assert again.trials == probe.trials and again.max_batch_size == 37
    assert again.memory_line == probe.memory_line and again.workload == workload


def test_an_answer_that_is_not_the_expected_shape_is_a_service_error(service: Service) -> None:
    with fast_client(service) as client, pytest.raises(ServiceError) as caught:
        health = client._request("GET", "/healthz")  # fine as JSON...
        _parse(Plan, health, "plan")  # ...but not a plan
    assert caught.value.code == "bad_response"


# ------------------------------------------------------------------------ connection errors


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_connection_refused_is_retried_then_reported_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with (
        TunerClient(url, retries=2, backoff=0.05, timeout=2) as client,
        pytest.raises(ServiceError) as caught,
    ):
        client.list_plans()
    assert time.monotonic() - started >= 0.05 + 0.1
    assert caught.value.code == "service_unreachable"
    assert url in caught.value.message and "3 attempt(s)" in caught.value.message


def test_the_backoff_carries_a_client_over_a_server_that_is_still_starting(tmp_path: Path) -> None:
    port = free_port()
    database_url = f"sqlite:///{tmp_path / 'tuner.db'}"
    # Started, not waited for: uvicorn takes a second or more before it listens.
    process = launch(
        uvicorn_command(API_APP, port),
        env=clean_env({"TUNER_DATABASE_URL": database_url}),
        log_path=tmp_path / "api.log",
    )
    try:
        assert refuses_connections(port)
        started = time.monotonic()
        with TunerClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1) as client:
            assert client.health() == {"status": "ok", "database": "ok"}
            assert client.list_plans().total == 0
        assert time.monotonic() - started >= 0.1  # at least one refused attempt was retried
    finally:
        stop_process(process)


# ----------------------------------------------------------------- 503: the database goes away


class BlockableDatabase:
    """A PostgreSQL database whose connections can be refused and allowed again, the way a
    database restarting or failing over refuses them."""

    def __init__(self, admin: PostgresAdmin, name: str) -> None:
        self.admin = admin
        self.name = name

    def block(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self.admin.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.name}'"
        )

    def allow(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture(scope="module")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, BlockableDatabase]]:
    """The API on a PostgreSQL database of its own, with its access log (every answer's status)."""
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    admin = PostgresAdmin()
    name = admin.create("tuner_client")
    database = BlockableDatabase(admin, name)
    try:
        with running_api_server(
            admin.url(name),
            tmp_path_factory.mktemp("client-pg"),
            log_level="info",
            env={"PYTHONUNBUFFERED": "1"},
        ) as server:
            yield server, database
    finally:
        database.allow()
        admin.drop(name)
        admin.dispose()


@pytest.fixture
def outage(
    postgres_server: tuple[ServerProcess, BlockableDatabase],
) -> Iterator[tuple[ServerProcess, BlockableDatabase]]:
    """The database refuses connections from the start of the test until it calls `allow`."""
    server, database = postgres_server
    database.block()
    try:
        yield server, database
    finally:
        database.allow()


def health_answers(server: ServerProcess, status: int) -> int:
    return len(re.findall(rf'"GET /healthz HTTP/1\.1" {status}\b', server.log()))


@pytest.mark.postgres
def test_503_is_retried_with_backoff_then_served(outage: tuple[ServerProcess, BlockableDatabase]) -> None:
    server, database = outage
    unavailable_before = health_answers(server, 503)

    def allow_after_two_refusals() -> None:
        deadline = time.monotonic() + 20
        while health_answers(server, 503) < unavailable_before + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        database.allow()

    reopen = threading.Thread(target=allow_after_two_refusals)
    reopen.start()
    try:
        with TunerClient(server.base_url, retries=3, backoff=0.3) as client:
            started = time.monotonic()
            assert client.health() == {"status": "ok", "database": "ok"}
            elapsed = time.monotonic() - started
    finally:
        reopen.join()
    assert health_answers(server, 503) == unavailable_before + 2
    assert elapsed >= 0.3 + 0.6  # backoff × 2^0, then × 2^1


@pytest.mark.postgres
def test_503_beyond_the_retries_raises_the_servers_detail(
    outage: tuple[ServerProcess, BlockableDatabase],
) -> None:
    server, _ = outage
    unavailable_before = health_answers(server, 503)
    with (
        TunerClient(server.base_url, retries=1, backoff=0.01) as client,
        pytest.raises(ServiceError) as caught,
    ):
        client.health()
    assert (caught.value.status_code, caught.value.code) == (503, "database_unavailable")
    assert caught.value.message == "The database is unavailable; try again shortly."
    # The access log is written by another process: give its last line a moment.
    deadline = time.monotonic() + 5
    while health_answers(server, 503) < unavailable_before + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health_answers(server, 503) == unavailable_before + 2
    with TunerClient(server.base_url, retries=0) as client, pytest.raises(ServiceError) as caught:
        client.list_plans()
    assert (caught.value.status_code, caught.value.code) == (503, "database_unavailable")
