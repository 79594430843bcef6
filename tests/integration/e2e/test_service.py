"""End to end: a real API server, real worker processes, estimate probes of tiny models."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.integration.e2e.conftest import FACTORIES, Service, mlp_request
from tests.servers import wait_until
from tuner.spec import parse_workload

pytestmark = pytest.mark.slow


def fingerprint(request: dict[str, Any]) -> str:
    return parse_workload(request["workload"]).fingerprint()


def test_plan_is_probed_once_then_served_from_the_cache(workers: Service) -> None:
    request = mlp_request(64)
    with workers.client() as client:
        # No worker is up yet: refused, unless queued on purpose for a worker that starts later.
        refused = client.post("/v1/plans", json=request)
        assert refused.status_code == 409 and refused.json()["code"] == "no_worker", refused.text
        queued = client.post("/v1/plans", params={"queue_without_worker": "true"}, json=request)
        assert queued.status_code == 202, queued.text
        assert queued.json()["worker_available"] is False
        job = queued.json()
        assert queued.headers["Location"] == f"/v1/jobs/{job['id']}" and job["status"] == "queued"

        workers.start_worker("flow")
        finished = workers.wait_for_job(job["id"])
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["plan_id"] is not None and finished["attempts"] == 1
        plan = client.get(f"/v1/plans/{finished['plan_id']}").json()
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == 512
        assert plan["backend"] == "estimate" and plan["device"]["name"] == "Test GPU 2GiB"

        again = client.post("/v1/plans", json=request)
        assert again.status_code == 200 and again.json()["cache_hit"] is True
        assert again.json()["id"] == plan["id"]

        # A new effective batch on the probed workload: planned from the stored probe at once.
        bigger = client.post("/v1/plans", json=mlp_request(64, effective_batch_size=4096))
        assert bigger.status_code == 200, bigger.text
        assert bigger.json()["cache_hit"] is True and bigger.json()["effective_batch_size"] == 4096
        assert bigger.json()["probe_id"] == plan["probe_id"]
        assert workers.probe_rows(fingerprint(request)) == 1

        listed = client.get("/v1/plans", params={"fingerprint": plan["fingerprint"]}).json()
        assert listed["total"] == 2
        assert [item["effective_batch_size"] for item in listed["items"]] == [4096, 512]  # newest first
        page = client.get("/v1/plans", params={"fingerprint": plan["fingerprint"], "limit": 1, "offset": 1})
        assert [item["id"] for item in page.json()["items"]] == [plan["id"]]
        assert page.json()["total"] == 2
        by_device = client.get("/v1/plans", params={"device_name": "Test GPU 2GiB", "model": "mlp"}).json()
        assert {item["id"] for item in listed["items"]} <= {item["id"] for item in by_device["items"]}
        other_device = client.get("/v1/plans", params={"device_name": "No Such GPU"}).json()
        assert other_device == {"items": [], "total": 0}


def test_fifty_identical_requests_share_one_probe(workers: Service) -> None:
    request = mlp_request(48)
    workers.start_worker("crowd")

    def ask(_: int) -> httpx.Response:
        with workers.client() as client:
            return client.post("/v1/plans", params={"wait": 120}, json=request)

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50)))

    assert [answer.status_code for answer in answers] == [200] * 50, answers[0].text
    assert len({answer.json()["id"] for answer in answers}) == 1  # every client, the same plan
    assert workers.job_rows(fingerprint(request)) == 1
    assert workers.probe_rows(fingerprint(request)) == 1
    # The worker, another process, told the API: NOTIFY on PostgreSQL, the API's poll on SQLite.
    with workers.client() as client:
        metrics = client.get("/metrics").text
    woken_by = "notify" if workers.database_url.startswith("postgresql") else "poll"
    assert f'tuner_job_watch_checks_total{{reason="{woken_by}"}}' in metrics


def test_a_job_whose_worker_is_killed_is_finished_by_another(workers: Service) -> None:
    request = mlp_request(40)
    first = workers.start_worker("killed")
    with workers.client() as client:
        job = client.post("/v1/plans", json=request).json()

        def running() -> bool:
            state = client.get(f"/v1/jobs/{job['id']}").json()
            return bool(state["status"] == "running")

        wait_until(running, timeout=60, what="the first worker to claim the job")
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        workers.start_worker("rescuer")
        finished = workers.wait_for_job(job["id"])
        assert finished["status"] == "succeeded", finished["error"]
        assert finished["attempts"] == 2  # the killed worker's claim, then the rescuer's
        assert finished["plan_id"] is not None
    assert workers.probe_rows(fingerprint(request)) == 1
    assert workers.job_rows(fingerprint(request)) == 1


def test_crashing_and_hanging_probes_fail_clearly_and_the_worker_lives_on(workers: Service) -> None:
    worker = workers.start_worker("faults", TUNER_PROBE_TIMEOUT_SECONDS="10")
    with workers.client() as client:
        hangs = client.post("/v1/plans", json=mlp_request(0, factory=f"{FACTORIES}:hangs")).json()
        # A client waiting on a job that keeps crashing hears why once the retries are spent.
        aborts = client.post(
            "/v1/plans", params={"wait": 120}, json=mlp_request(0, factory=f"{FACTORIES}:aborts")
        )
        assert aborts.status_code == 503, aborts.text
        assert aborts.json()["code"] == "probe_failed"
        assert "after 2 attempt(s)" in aborts.json()["detail"]
        assert "aborted (SIGABRT)" in aborts.json()["detail"]

        hung = workers.wait_for_job(hangs["id"])
        assert hung["status"] == "failed" and hung["attempts"] == 2
        assert "did not finish within" in hung["error"]

        # The same worker is still serving: a spec that does not build fails at once (no retry),
        # and the waiting client gets a 422 naming the problem.
        assert worker.poll() is None
        broken = client.post(
            "/v1/plans", params={"wait": 60}, json=mlp_request(0, factory=f"{FACTORIES}:raises")
        )
        assert broken.status_code == 422, broken.text
        assert broken.json()["code"] == "model_build_failed"
        assert "this model definition is broken" in broken.json()["detail"]
    assert worker.poll() is None
    assert "Claimed job" in workers.log("worker-faults")
