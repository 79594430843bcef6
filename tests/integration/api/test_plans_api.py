"""`/v1/plans` and `/v1/jobs` against a real uvicorn server on SQLite and PostgreSQL.

Probe results are seeded through the repository; the test plays the worker's part with the
repository's queue functions where a job must finish.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from storage import repository
from storage.db import connection_capacity
from storage.records import Accepts
from tests.integration.api.conftest import Server, error_of
from tests.integration.api.seeding import (
    DEVICE,
    OTHER_DEVICE,
    mlp_workload,
    plan_request,
    probe_result,
    seed_probes,
)
from tests.servers import wait_until
from tuner.planner import make_plan
from tuner.spec import parse_plan_request

QUEUE_ANYWAY = {"queue_without_worker": "true"}
"""No worker runs beside these servers: requests that must queue a job say so on purpose."""


def jobs_with_fingerprint(server: Server, fingerprint: str) -> list[repository.JobRecord]:
    return [job for job in repository.list_jobs(server.engine, limit=1000) if fingerprint in job.key]


@pytest.fixture
def live_estimate_worker(server: Server) -> Iterator[str]:
    """The worker the test plays (through the repository), announced as live while the test runs."""
    worker_id = "test-worker"
    repository.announce_worker(
        server.engine, worker_id=worker_id, accepts=Accepts(backend="estimate"), ttl_seconds=120
    )
    yield worker_id
    repository.retire_worker(server.engine, worker_id=worker_id)


def test_cached_probes_give_a_plan_at_once_and_the_same_plan_again(server: Server) -> None:
    workload = mlp_workload(hidden_dim=65)
    probe_ids = seed_probes(server.engine, workload)
    body = plan_request(workload, effective_batch_size=64)
    with server.authorized() as client:
        first = client.post("/v1/plans", json=body)
        assert first.status_code == 200, first.text
        plan = first.json()
        assert plan["cache_hit"] is True
        assert plan["fingerprint"] == workload.fingerprint()
        assert plan["probe_ids"] == {"off": probe_ids[False], "on": probe_ids[True]}
        # What the planner derives from the same probes, not a number written into this test.
        request = parse_plan_request(body)
        probes = {gc: repository.get_probe(server.engine, probe_id=pid) for gc, pid in probe_ids.items()}
        expected = make_plan(request, probes)
        assert (plan["micro_batch_size"], plan["accumulation_steps"], plan["gradient_checkpointing"]) == (
            expected.micro_batch_size,
            expected.accumulation_steps,
            expected.gradient_checkpointing,
        )
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == 64

        again = client.post("/v1/plans", json=body)
        assert again.status_code == 200 and again.json()["id"] == plan["id"]
        assert again.json()["cache_hit"] is True
        # The cached answer (served before routing) still checks the query like any request.
        assert client.post("/v1/plans", params={"wait": 5}, json=body).json()["id"] == plan["id"]
        bad_wait = client.post("/v1/plans", params={"wait": "soon"}, json=body)
        assert bad_wait.status_code == 422 and "wait" in error_of(bad_wait)["detail"]
        # Read by the same parser as the router's: a blank value is refused, cached or not.
        blank_wait = client.post("/v1/plans?wait=", json=body)
        assert blank_wait.status_code == 422 and "wait" in error_of(blank_wait)["detail"]
        bad_flag = client.post("/v1/plans", params={"queue_without_worker": "maybe"}, json=body)
        assert bad_flag.status_code == 422 and "queue_without_worker" in error_of(bad_flag)["detail"]
        # Other bytes, same request (reordered keys, explicit defaults): the database finds it.
        reordered = json.dumps({"world_size": 1, **dict(reversed(list(body.items())))}, indent=1)
        same = client.post("/v1/plans", content=reordered, headers={"content-type": "application/json"})
        assert same.status_code == 200 and same.json()["id"] == plan["id"]
        assert client.get(f"/v1/plans/{plan['id']}").json()["micro_batch_size"] == plan["micro_batch_size"]
    assert jobs_with_fingerprint(server, workload.fingerprint()) == []


def test_a_new_effective_batch_is_planned_without_a_probe(server: Server) -> None:
    workload = mlp_workload(hidden_dim=66)
    seed_probes(server.engine, workload)
    with server.authorized() as client:
        small = client.post("/v1/plans", json=plan_request(workload, effective_batch_size=64)).json()
        large = client.post("/v1/plans", json=plan_request(workload, effective_batch_size=1024))
        assert large.status_code == 200, large.text
        plan = large.json()
        assert plan["id"] != small["id"] and plan["cache_hit"] is True
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == 1024
        assert plan["probe_ids"] == small["probe_ids"]
        # Four ranks without a wrapper hold what one holds: the same probes answer. (DDP, the
        # default at four ranks, holds its buckets too: another probe key.)
        world = client.post(
            "/v1/plans",
            json={
                **plan_request(workload, effective_batch_size=1024),
                "world_size": 4,
                "parallelism": {"strategy": "none"},
            },
        )
        assert world.status_code == 200, world.text
        assert world.json()["micro_batch_size"] * world.json()["accumulation_steps"] * 4 == 1024
    assert jobs_with_fingerprint(server, workload.fingerprint()) == []


def test_plans_are_listed_newest_first_with_filters_and_pages(server: Server) -> None:
    workload = mlp_workload(hidden_dim=67)
    seed_probes(server.engine, workload)
    fingerprint = workload.fingerprint()
    with server.authorized() as client:
        ids = [
            client.post("/v1/plans", json=plan_request(workload, effective_batch_size=b)).json()["id"]
            for b in (16, 32, 48, 64, 80)
        ]
        listed = client.get("/v1/plans", params={"fingerprint": fingerprint}).json()
        assert listed["total"] == 5
        assert [p["id"] for p in listed["items"]] == sorted(ids, reverse=True)
        page = client.get("/v1/plans", params={"fingerprint": fingerprint, "limit": 2, "offset": 2}).json()
        assert page["total"] == 5 and [p["id"] for p in page["items"]] == sorted(ids, reverse=True)[2:4]
        on_device = client.get("/v1/plans", params={"fingerprint": fingerprint, "device_name": DEVICE.name})
        assert on_device.json()["total"] == 5
        elsewhere = client.get("/v1/plans", params={"fingerprint": fingerprint, "device_name": "No Such GPU"})
        assert elsewhere.json() == {"items": [], "total": 0}
        by_model = client.get(
            "/v1/plans", params={"model": "mlp", "backend": "estimate", "limit": 200}
        ).json()
        assert set(ids) <= {p["id"] for p in by_model["items"]}
        assert (
            client.get("/v1/plans", params={"backend": "cuda", "fingerprint": fingerprint}).json()["total"]
            == 0
        )
        too_many = client.get("/v1/plans", params={"limit": 201})
        assert too_many.status_code == 422 and "limit" in error_of(too_many)["detail"]


def test_a_request_no_live_worker_can_run_is_refused_naming_what_it_needs(server: Server) -> None:
    workload = mlp_workload(hidden_dim=67)
    cuda = {**plan_request(workload, device=OTHER_DEVICE), "backend": "cuda"}
    with server.authorized() as client:
        refused = client.post(
            "/v1/plans", params={"wait": 5}, json=plan_request(workload, device=OTHER_DEVICE)
        )
        assert refused.status_code == 409, refused.text
        body = error_of(refused)
        assert body["code"] == "no_worker"
        assert "needs an estimate worker" in body["detail"] and "queue_without_worker=true" in body["detail"]
        repository.announce_worker(
            server.engine, worker_id="estimate-only", accepts=Accepts(backend="estimate"), ttl_seconds=60
        )
        try:
            # A server whose only worker is `estimate` refuses cuda, saying what is live.
            on_gpu = error_of(client.post("/v1/plans", json=cuda))
            assert on_gpu["code"] == "no_worker"
            assert f"a cuda worker on {OTHER_DEVICE.name}" in on_gpu["detail"]
            assert "the live workers are: estimate" in on_gpu["detail"]
        finally:
            repository.retire_worker(server.engine, worker_id="estimate-only")
        assert (
            error_of(client.post("/v1/plans", params={"queue_without_worker": "maybe"}, json=cuda))["code"]
            == "invalid_request"
        )
    assert jobs_with_fingerprint(server, workload.fingerprint()) == []


def test_an_uncached_request_queued_on_purpose_waits_for_a_worker(server: Server) -> None:
    workload = mlp_workload(hidden_dim=68)
    with server.authorized() as client:
        started = time.monotonic()
        response = client.post(
            "/v1/plans",
            params={"wait": 0.5, **QUEUE_ANYWAY},
            json=plan_request(workload, device=OTHER_DEVICE),
        )
        waited = time.monotonic() - started
        assert response.status_code == 202, response.text
        assert 0.4 <= waited < 5
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["location"]
        assert job["status"] == "queued" and job["attempts"] == 0 and job["plan_id"] is None
        assert job["worker_available"] is False  # machine-readable: no live worker can claim it yet
        assert job["gradient_checkpointing"] == [False, True]
        assert (job["device_name"], job["device_memory_bytes"]) == (
            OTHER_DEVICE.name,
            OTHER_DEVICE.total_memory_bytes,
        )
        polled = client.get(response.headers["location"])
        assert polled.status_code == 200 and polled.json()["id"] == job["id"]
        # A second ask joins the same job.
        again = client.post(
            "/v1/plans", params=QUEUE_ANYWAY, json=plan_request(workload, device=OTHER_DEVICE)
        )
        assert again.status_code == 202 and again.json()["id"] == job["id"]
    stored = jobs_with_fingerprint(server, workload.fingerprint())
    assert [j.id for j in stored] == [job["id"]]
    assert stored[0].payload == {
        "workload": workload.model_dump(mode="json"),
        "device": OTHER_DEVICE.model_dump(mode="json"),
        "backend": "estimate",
        "gradient_checkpointing": [False, True],
        "torch_minor": "2.13",
        "alloc_conf": None,
        "parallel": {"parallelism": {"strategy": "none"}, "world_size": 1},
    }
    assert len(repository.list_waiters(server.engine, job_id=job["id"])) == 2


def test_a_job_whose_payload_this_version_cannot_read_is_still_shown(server: Server) -> None:
    """A job queued by another version (here: a workload key this one refuses) is the worker's
    to refuse; `GET /v1/jobs/{id}` shows it, not a 500."""
    workload = mlp_workload(hidden_dim=69).model_dump(mode="json")
    workload["model"]["kwargs"]["not_a_kwarg_of_this_version"] = 1
    payload = {"workload": workload, "device": None, "backend": "estimate", "gradient_checkpointing": [False]}
    job, _ = repository.enqueue_or_join(
        server.engine, key="unreadable-payload", payload=payload, max_attempts=1, backend="estimate"
    )
    with server.authorized() as client:
        shown = client.get(f"/v1/jobs/{job.id}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["status"] == "queued" and shown.json()["gradient_checkpointing"] == []


def test_fifty_concurrent_identical_requests_make_one_job(server: Server) -> None:
    workload = mlp_workload(hidden_dim=69)
    body = plan_request(workload, device=OTHER_DEVICE, checkpointing="off")

    def ask(_: int) -> httpx.Response:
        with server.authorized() as client:
            return client.post("/v1/plans", params=QUEUE_ANYWAY, json=body)

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(ask, range(50)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    jobs = jobs_with_fingerprint(server, workload.fingerprint())
    assert len(jobs) == 1 and jobs[0].payload["gradient_checkpointing"] == [False]
    assert len(repository.list_waiters(server.engine, job_id=jobs[0].id)) == 50


def _work_the_job(
    server: Server, fingerprint: str, *, succeed: bool, error: str = "", error_code: str | None = None
) -> None:
    """What a worker does, through the repository: claim, store the probes, complete (or fail)."""
    deadline = time.monotonic() + 20
    job = None
    while job is None and time.monotonic() < deadline:
        job = repository.claim_job(
            server.engine, worker_id="test-worker", lease_seconds=30, accepts=Accepts(backend="estimate")
        )
        if job is not None and fingerprint not in job.key:
            repository.release_job(server.engine, job_id=job.id, worker_id="test-worker")
            job = None
        time.sleep(0.05)
    assert job is not None, "the request did not queue a job"
    if not succeed:
        repository.fail_job(
            server.engine,
            job_id=job.id,
            worker_id="test-worker",
            error=error,
            error_code=error_code,
            retry_backoff_seconds=0,
            retry=False,
        )
        return
    workload = mlp_workload(hidden_dim=job.payload["workload"]["model"]["kwargs"]["hidden_dim"])
    probe_ids = [
        repository.save_probe(
            server.engine, result=probe_result(workload, device=OTHER_DEVICE, checkpointing=gc)
        )
        for gc in job.payload["gradient_checkpointing"]
    ]
    time.sleep(0.3)  # the waiting request is polling meanwhile
    assert repository.complete_job(
        server.engine, job_id=job.id, worker_id="test-worker", probe_id=probe_ids[-1]
    )


def test_a_waiting_request_gets_its_plan_as_soon_as_the_job_finishes(
    server: Server, live_estimate_worker: str
) -> None:
    workload = mlp_workload(hidden_dim=70)
    worker = threading.Thread(
        target=_work_the_job, args=(server, workload.fingerprint()), kwargs={"succeed": True}
    )
    worker.start()
    with server.authorized() as client:
        started = time.monotonic()
        response = client.post(
            "/v1/plans", params={"wait": 60}, json=plan_request(workload, device=OTHER_DEVICE)
        )
        waited = time.monotonic() - started
        worker.join()
        assert response.status_code == 200, response.text
        assert waited < 15
        plan = response.json()
        assert plan["cache_hit"] is False  # a probe ran for this request
        assert plan["device"]["name"] == OTHER_DEVICE.name
        again = client.post("/v1/plans", json=plan_request(workload, device=OTHER_DEVICE))
        assert (
            again.status_code == 200
            and again.json()["id"] == plan["id"]
            and again.json()["cache_hit"] is True
        )
        job_id = jobs_with_fingerprint(server, workload.fingerprint())[0].id
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["finished_at"] is not None


def _metric(client: httpx.Client, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.M)
    assert found is not None, f"no {name} in /metrics"
    return float(found.group(1))


def test_a_herd_larger_than_the_connection_pool_waits_on_one_watch(
    server: Server, live_estimate_worker: str
) -> None:
    workload = mlp_workload(hidden_dim=75)
    body = plan_request(workload, device=OTHER_DEVICE)
    ranks = 4 * connection_capacity(server.engine)  # the server's engine is built the same way

    async def herd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=ranks)
        headers = {"Authorization": f"Bearer {server.token}"}
        async with httpx.AsyncClient(
            base_url=server.base_url, headers=headers, limits=limits, timeout=120
        ) as client:
            return list(
                await asyncio.gather(
                    *(client.post("/v1/plans", params={"wait": 60}, json=body) for _ in range(ranks))
                )
            )

    with ThreadPoolExecutor(max_workers=1) as pool, server.client() as client:
        answers = pool.submit(asyncio.run, herd())
        wait_until(
            lambda: _metric(client, "tuner_plan_requests_waiting") == ranks,
            timeout=60,
            what=f"{ranks} waiting requests",
        )
        assert _metric(client, "tuner_jobs_watched") == 1
        # Waiting costs the API a look per poll for the one job, not a query per request: a
        # poll loop per request (every 100 ms) would send hundreds of statements a second.
        before = _metric(client, "tuner_db_statements_total")
        scrape = _metric(client, "tuner_db_statements_total") - before
        time.sleep(2.0)
        during = _metric(client, "tuner_db_statements_total") - before - 2 * scrape
        assert during <= 20, f"{during:.0f} statements in 2 s of waiting"
        _work_the_job(server, workload.fingerprint(), succeed=True)
        responses = answers.result(timeout=120)
    assert [r.status_code for r in responses] == [200] * ranks, responses[0].text
    plan_ids = {r.json()["id"] for r in responses}
    assert len(plan_ids) == 1 and {r.json()["cache_hit"] for r in responses} == {False}
    [job] = jobs_with_fingerprint(server, workload.fingerprint())
    waiters = repository.list_waiters(server.engine, job_id=job.id)
    # The test's worker derived no plan: the API resolved every waiter row, each once, to the plan.
    assert len(waiters) == ranks
    assert {(w.status, w.plan_id) for w in waiters} == {("resolved", plan_ids.pop())}


def test_a_failed_job_answers_with_its_error(server: Server, live_estimate_worker: str) -> None:
    cases: list[tuple[int, str, str | None, str, int]] = [
        (
            71,
            "The builtin model could not be built: bad kwargs.",
            "model_build_failed",
            "model_build_failed",
            422,
        ),
        (72, "The probe child process crashed (signal 6).", None, "probe_failed", 503),
        # Only the code column says whose fault it is, not the sentence's first word.
        (171, "nothing_fits: a crash that reads like a code.", None, "probe_failed", 503),
        (172, "The job names no device and this worker has none.", "device_required", "device_required", 422),
    ]
    for hidden, error, error_code, code, status in cases:
        workload = mlp_workload(hidden_dim=hidden)
        worker = threading.Thread(
            target=_work_the_job,
            args=(server, workload.fingerprint()),
            kwargs={"succeed": False, "error": error, "error_code": error_code},
        )
        worker.start()
        with server.authorized() as client:
            response = client.post(
                "/v1/plans", params={"wait": 30}, json=plan_request(workload, device=OTHER_DEVICE)
            )
        worker.join()
        assert response.status_code == status, response.text
        body = error_of(response)
        assert body["code"] == code
        assert error.rstrip(".") in body["detail"]


def test_writes_need_the_token(server: Server) -> None:
    workload = mlp_workload(hidden_dim=73)
    seed_probes(server.engine, workload)
    body = plan_request(workload)
    with server.client() as anonymous:
        missing = anonymous.post("/v1/plans", json=body)
        assert missing.status_code == 401
        assert error_of(missing)["code"] == "unauthorized" and "Bearer" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        # Reads stay open.
        assert anonymous.get("/v1/plans").status_code == 200
    with server.client(token="wrong") as wrong:
        refused = wrong.post("/v1/plans", json=body)
        assert refused.status_code == 401 and "not valid" in error_of(refused)["detail"]
        assert wrong.post("/v1/probes", json={}).status_code == 401
    with server.authorized() as client:
        assert client.post("/v1/plans", json=body).status_code == 200
    # A cached answer still needs the token.
    with server.client(token="wrong") as wrong:
        assert wrong.post("/v1/plans", json=body).status_code == 401


def test_bad_requests_get_their_status_and_a_clear_detail(server: Server) -> None:
    good: dict[str, Any] = plan_request(mlp_workload(hidden_dim=74))
    with server.authorized() as client:
        malformed = client.post(
            "/v1/plans", content=b'{"workload": ', headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422 and error_of(malformed)["code"] == "invalid_json"
        empty = client.post("/v1/plans", content=b"")
        assert empty.status_code == 422 and "empty" in error_of(empty)["detail"]
        not_object = client.post("/v1/plans", json=[1, 2])
        assert not_object.status_code == 422 and "object" in error_of(not_object)["detail"]

        wrong_type = client.post("/v1/plans", json={**good, "effective_batch_size": "many"})
        assert wrong_type.status_code == 422
        assert (
            error_of(wrong_type)["code"] == "invalid_spec"
            and "effective_batch_size" in wrong_type.json()["detail"]
        )
        nested = dict(good)
        nested["workload"] = {**good["workload"], "inputs": {"kind": "features", "dim": -3}}
        bad_dim = client.post("/v1/plans", json=nested)
        assert bad_dim.status_code == 422 and "inputs.dim" in error_of(bad_dim)["detail"]

        no_device = client.post("/v1/plans", json={k: v for k, v in good.items() if k != "device"})
        assert no_device.status_code == 422 and error_of(no_device)["code"] == "device_required"
        indivisible = client.post("/v1/plans", json={**good, "effective_batch_size": 10, "world_size": 4})
        assert indivisible.status_code == 422 and error_of(indivisible)["code"] == "plan_impossible"
        bad_wait = client.post("/v1/plans", params={"wait": 301}, json=good)
        assert bad_wait.status_code == 422 and "wait" in error_of(bad_wait)["detail"]

        oversized = client.post("/v1/plans", content=b"{" + b" " * 200_000 + b"}")
        assert oversized.status_code == 413 and error_of(oversized)["code"] == "body_too_large"

        def chunks() -> Any:
            for _ in range(30):
                yield b" " * 10_000

        chunked = client.post("/v1/plans", content=chunks())
        assert chunked.status_code == 413 and error_of(chunked)["code"] == "body_too_large"

        for path in ("/v1/plans/987654", "/v1/jobs/987654", "/v1/probes/987654", "/v1/nothing"):
            missing = client.get(path)
            assert missing.status_code == 404 and error_of(missing)["code"] == "not_found", path
        huge_id = client.get("/v1/plans/99999999999999999999")
        assert huge_id.status_code == 422 and "plan_id" in error_of(huge_id)["detail"]
        wrong_method = client.delete("/v1/plans")
        assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"
        assert client.put("/v1/jobs/1").status_code == 405


def test_health_metrics_and_page(server: Server) -> None:
    workload = mlp_workload(hidden_dim=75)
    seed_probes(server.engine, workload)
    with server.authorized() as client:
        assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
        client.post("/v1/plans", json=plan_request(workload))
        client.post("/v1/plans", json=plan_request(workload))
        client.post(
            "/v1/plans",
            params=QUEUE_ANYWAY,
            json=plan_request(mlp_workload(hidden_dim=76), device=OTHER_DEVICE),
        )
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'tuner_http_requests_total{method="POST",route="/v1/plans",status="200"}' in text
        assert 'tuner_http_request_duration_seconds_bucket{le="0.005",route="/v1/plans"}' in text
        assert 'tuner_plan_cache_total{layer="memory",result="hit"}' in text
        assert 'tuner_plan_cache_total{layer="none",result="miss"}' in text
        assert 'tuner_jobs{status="queued"}' in text
        assert 'tuner_probe_seconds_total{backend="estimate"}' in text
        page = client.get("/ui/plans")
        assert page.status_code == 200 and "<table" in page.text and "Test GPU 1GiB" in page.text
        document = client.get("/openapi.json").json()
        assert document["paths"]["/v1/plans"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ] == {"$ref": "#/components/schemas/PlanRequest"}
        assert "PlanRequest" in document["components"]["schemas"]
