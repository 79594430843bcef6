"""TunerClient over real HTTP against a contract-following server."""

from __future__ import annotations

import time

import pytest

from tests.training.contract_server import ContractState, free_port
from tuner.client import Job, TunerClient
from tuner.errors import ServiceError
from tuner.results import Plan, ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanRequest, parse_workload

DEVICE = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
WORKLOAD = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64}},
        "inputs": {"kind": "features", "dim": 32},
        "precision": "fp32",
    }
)


def plan_request(effective_batch_size: int = 48) -> PlanRequest:
    return PlanRequest(
        workload=WORKLOAD, effective_batch_size=effective_batch_size, device=DEVICE, backend="estimate"
    )


def fast_client(url: str, **kwargs: object) -> TunerClient:
    return TunerClient(url, backoff=0.01, poll_interval=0.02, **kwargs)  # type: ignore[arg-type]


def test_create_plan_follows_the_202_job_to_the_plan_then_hits_the_cache(
    contract_server: str, contract_state: ContractState
) -> None:
    with fast_client(contract_server) as client:
        seen: list[str] = []
        submitted = client.submit_plan(plan_request())
        assert isinstance(submitted, Job) and submitted.status == "queued"
        job = client.wait_for_job(submitted, on_update=lambda j: seen.append(j.status))
        assert seen[0] == "queued" and "running" in seen and seen[-1] == "succeeded"
        plan = client.get_plan(job.plan_id)  # type: ignore[arg-type]
        assert plan.micro_batch_size * plan.accumulation_steps == 48
        assert plan.fingerprint == WORKLOAD.fingerprint() and not plan.cache_hit

        again = client.create_plan(plan_request(), progress=False)
        assert again.cache_hit and again.id == plan.id
        assert isinstance(client.submit_plan(plan_request()), Plan)

        fresh = client.create_plan(plan_request(96), wait=1, progress=True)  # progress bar path
        assert fresh.effective_batch_size == 96 and fresh.id != plan.id
    posts = [path for method, path, _ in contract_state.requests if method == "POST"]
    assert "/v1/plans?wait=1" in posts and "/v1/plans?wait=0" in posts


def test_a_failed_job_raises_with_the_servers_reason(
    contract_server: str, contract_state: ContractState
) -> None:
    contract_state.fail_jobs_with = "The probe child crashed (SIGSEGV) before returning a result."
    with fast_client(contract_server) as client, pytest.raises(ServiceError) as caught:
        client.create_plan(plan_request(), progress=False)
    assert caught.value.code == "job_failed"
    assert "SIGSEGV" in caught.value.message


def test_polling_gives_up_after_max_seconds(contract_server: str, contract_state: ContractState) -> None:
    contract_state.polls_to_finish = 10_000
    with fast_client(contract_server) as client, pytest.raises(ServiceError) as caught:
        client.create_plan(plan_request(), max_seconds=0.3, progress=False)
    assert caught.value.code == "job_timeout"


def test_server_errors_carry_detail_code_and_status(contract_server: str) -> None:
    with fast_client(contract_server) as client:
        with pytest.raises(ServiceError) as caught:
            client.get_plan(424242)
        assert (caught.value.status_code, caught.value.code) == (404, "not_found")
        assert caught.value.message == "No plan with id 424242."
        with pytest.raises(ServiceError) as caught:
            client.get_job(7)
        assert caught.value.status_code == 404


def test_writes_need_the_token_and_the_client_sends_it(
    contract_server: str, contract_state: ContractState
) -> None:
    contract_state.token = "s3cret"
    with fast_client(contract_server) as anonymous, pytest.raises(ServiceError) as caught:
        anonymous.submit_plan(plan_request())
    assert (caught.value.status_code, caught.value.code) == (401, "unauthorized")
    with fast_client(contract_server, token="s3cret") as client:
        assert isinstance(client.submit_plan(plan_request()), Job)
    assert contract_state.requests[-1][2] == "Bearer s3cret"


def test_503_is_retried_with_backoff_then_served(contract_server: str, contract_state: ContractState) -> None:
    contract_state.unavailable = 2
    with TunerClient(contract_server, retries=3, backoff=0.1) as client:
        started = time.monotonic()
        assert client.health()["status"] == "ok"
        elapsed = time.monotonic() - started
    assert len(contract_state.requests) == 3
    assert elapsed >= 0.1 + 0.2  # backoff × 2^0, then × 2^1


def test_503_beyond_the_retries_raises_the_servers_detail(
    contract_server: str, contract_state: ContractState
) -> None:
    contract_state.unavailable = 5
    with fast_client(contract_server, retries=1) as client, pytest.raises(ServiceError) as caught:
        client.health()
    assert (caught.value.status_code, caught.value.code) == (503, "unavailable")
    assert len(contract_state.requests) == 2


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


def test_list_plans_filters_and_pages(contract_server: str, contract_state: ContractState) -> None:
    with fast_client(contract_server) as client:
        ids = [client.create_plan(plan_request(b), progress=False).id for b in (16, 32, 64)]
        page = client.list_plans(limit=2)
        assert page.total == 3 and [p.id for p in page.items] == ids[::-1][:2]
        assert [p.id for p in client.list_plans(limit=2, offset=2).items] == ids[:1]
        assert (
            client.list_plans(fingerprint=WORKLOAD.fingerprint(), device_name=DEVICE.name, model="mlp").total
            == 3
        )
        assert client.list_plans(device_name="NVIDIA A100-SXM4-40GB").total == 0
    assert any("device_name=NVIDIA" in path for _, path, _ in contract_state.requests)


def test_upload_probe_returns_it_with_an_id_and_get_probe_reads_it_back(contract_server: str) -> None:
    probe = ProbeResult(
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DEVICE,
        backend="cuda",
        gradient_checkpointing=False,
        max_batch_size=37,
        trials=[Trial(32, True, 1 << 30, 5 << 29, 0.5), Trial(38, False, error="out_of_memory")],
        memory_line=MemoryLine(1e9, 2e7),
    )
    with fast_client(contract_server) as client:
        stored = client.upload_probe(probe)
        assert stored.id is not None and stored.created_at is not None
        again = client.get_probe(stored.id)
    assert (
        again.trials == probe.trials and again.max_batch_size == 37 and again.memory_line == probe.memory_line
    )


def test_an_answer_that_is_not_the_expected_shape_is_a_service_error(contract_server: str) -> None:
    with fast_client(contract_server) as client, pytest.raises(ServiceError) as caught:
        client._request("GET", "/healthz")  # fine as JSON...
        from tuner.client import _parse

        _parse(Plan, client._request("GET", "/healthz"), "plan")  # ...but not a plan
    assert caught.value.code == "bad_response"
