"""Racing clients on two API replicas sharing one database: identical probe uploads store one row
(one 201, the rest 200), a different answer racing for the same key gets 409, and identical plan
requests store one plan."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from storage.models import PlanRow, ProbeRow
from tests.integration.api.conftest import TOKEN, Server, error_of, start_server, stop_server
from tests.integration.api.seeding import mlp_workload, plan_request, probe_result, seed_probes

CLIENTS = 12


@pytest.fixture(scope="module")
def replica(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second API process on the same database, as in a fleet."""
    second = start_server(server.database_url, tmp_path_factory.mktemp("replica-logs"), token=TOKEN)
    try:
        yield second
    finally:
        stop_server(second)


def race_posts(servers: list[Server], path: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST each body at once (a barrier releases them), alternating between the servers."""
    barrier = threading.Barrier(len(bodies))

    def post(index: int) -> httpx.Response:
        server = servers[index % len(servers)]
        with server.authorized() as client:
            client.get("/healthz")  # connect before the barrier, so that the posts overlap
            barrier.wait(timeout=30)
            return client.post(path, json=bodies[index])

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, range(len(bodies))))


def upload_body(hidden_dim: int, *, max_batch_size_change: int = 0) -> dict[str, Any]:
    result = probe_result(mlp_workload(hidden_dim=hidden_dim), checkpointing=False, backend="cuda")
    body = result.model_dump(mode="json", exclude={"id", "created_at"})
    body["max_batch_size"] += max_batch_size_change
    return body


def stored_probes(server: Server, fingerprint: str) -> int:
    with server.engine.connect() as connection:
        query = select(func.count()).select_from(ProbeRow).where(ProbeRow.fingerprint == fingerprint)
        return int(connection.execute(query).scalar_one())


def test_identical_uploads_racing_store_one_result(server: Server, replica: Server) -> None:
    body = upload_body(90)
    responses = race_posts([server, replica], "/v1/probes", [body] * CLIENTS)

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (CLIENTS - 1) + [201], [r.text for r in responses if r.status_code >= 300]
    assert len({r.json()["id"] for r in responses}) == 1
    assert stored_probes(server, body["fingerprint"]) == 1


def test_different_answers_racing_for_one_key_conflict(server: Server, replica: Server) -> None:
    bodies = [upload_body(91, max_batch_size_change=-(i % 2)) for i in range(CLIENTS)]
    responses = race_posts([server, replica], "/v1/probes", bodies)

    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1
    winner = created[0].json()
    for body, response in zip(bodies, responses, strict=True):
        if response is created[0]:
            continue
        if body["max_batch_size"] == winner["max_batch_size"]:
            assert response.status_code == 200 and response.json()["id"] == winner["id"], response.text
        else:
            assert response.status_code == 409 and error_of(response)["code"] == "conflict", response.text
            assert str(winner["id"]) in response.json()["detail"]
    assert stored_probes(server, bodies[0]["fingerprint"]) == 1


def test_identical_plan_requests_racing_store_one_plan(server: Server, replica: Server) -> None:
    workload = mlp_workload(hidden_dim=92)
    seed_probes(server.engine, workload)
    request = plan_request(workload, effective_batch_size=96)
    responses = race_posts([server, replica], "/v1/plans", [request] * CLIENTS)

    assert [r.status_code for r in responses] == [200] * CLIENTS, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    with server.engine.connect() as connection:
        query = select(func.count()).select_from(PlanRow).where(PlanRow.fingerprint == workload.fingerprint())
        assert connection.execute(query).scalar_one() == 1
