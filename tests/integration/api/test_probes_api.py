"""`/v1/probes`: upload a probe measured elsewhere, read it back with every trial, and the
conflict rule; a plan request then uses the uploaded probe without a job."""

from __future__ import annotations

from typing import Any

from tests.integration.api.conftest import Server, error_of
from tests.integration.api.seeding import DEVICE, mlp_workload, plan_request, probe_result


def upload_body(hidden_dim: int, *, checkpointing: bool, backend: str = "cuda") -> dict[str, Any]:
    result = probe_result(mlp_workload(hidden_dim=hidden_dim), checkpointing=checkpointing, backend=backend)
    return result.model_dump(mode="json", exclude={"id", "created_at"})


def test_an_uploaded_probe_is_stored_with_its_trials_and_serves_plans(server: Server) -> None:
    with server.authorized() as client:
        bodies = [upload_body(80, checkpointing=gc) for gc in (False, True)]
        created = [client.post("/v1/probes", json=body) for body in bodies]
        assert [r.status_code for r in created] == [201, 201], created[0].text
        first = created[0].json()
        assert created[0].headers["location"] == f"/v1/probes/{first['id']}"
        read = client.get(f"/v1/probes/{first['id']}").json()
        assert [(t["batch_size"], t["ok"]) for t in read["trials"]] == [
            (t["batch_size"], t["ok"]) for t in bodies[0]["trials"]
        ]
        assert read["max_batch_size"] == bodies[0]["max_batch_size"]
        assert read["trials"][0]["peak_reserved_bytes"] == bodies[0]["trials"][0]["peak_reserved_bytes"]

        plan = client.post("/v1/plans", json=plan_request(mlp_workload(hidden_dim=80), backend="cuda"))
        assert plan.status_code == 200, plan.text
        assert plan.json()["probe_ids"] == {"off": first["id"], "on": created[1].json()["id"]}


def test_the_same_upload_is_idempotent_and_a_different_answer_conflicts(server: Server) -> None:
    with server.authorized() as client:
        body = upload_body(81, checkpointing=False)
        first = client.post("/v1/probes", json=body)
        assert first.status_code == 201
        again = client.post("/v1/probes", json=body)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        changed = {**body, "max_batch_size": body["max_batch_size"] - 1}
        conflict = client.post("/v1/probes", json=changed)
        assert conflict.status_code == 409 and error_of(conflict)["code"] == "conflict"
        assert str(first.json()["id"]) in conflict.json()["detail"]
        named = client.post(
            "/v1/probes", json={**upload_body(82, checkpointing=False), "id": first.json()["id"]}
        )
        assert named.status_code == 409


def test_an_upload_must_be_consistent(server: Server) -> None:
    with server.authorized() as client:
        body = upload_body(83, checkpointing=False)
        wrong_fingerprint = client.post("/v1/probes", json={**body, "fingerprint": "0" * 64})
        assert wrong_fingerprint.status_code == 422 and "fingerprint" in error_of(wrong_fingerprint)["detail"]
        no_torch = client.post("/v1/probes", json={**body, "versions": {}})
        assert no_torch.status_code == 422 and "versions.torch" in error_of(no_torch)["detail"]
        missing_field = client.post("/v1/probes", json={k: v for k, v in body.items() if k != "device"})
        assert missing_field.status_code == 422 and "device" in error_of(missing_field)["detail"]
        bad_device = client.post(
            "/v1/probes", json={**body, "device": {**DEVICE.model_dump(), "total_memory_bytes": -1}}
        )
        assert bad_device.status_code == 422 and "total_memory_bytes" in error_of(bad_device)["detail"]


def test_a_result_that_measured_no_gpu_memory_is_refused(server: Server) -> None:
    with server.authorized() as client:
        body = upload_body(84, checkpointing=False)
        on_cpu = client.post("/v1/probes", json={**body, "backend": "cpu"})
        assert on_cpu.status_code == 422 and "on CPU is no measurement" in error_of(on_cpu)["detail"]
        no_memory = {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
        unmeasured = [{**t, **no_memory} for t in body["trials"]]
        no_peaks = client.post("/v1/probes", json={**body, "trials": unmeasured})
        assert no_peaks.status_code == 422 and "peak memory" in error_of(no_peaks)["detail"]
        # Nothing was stored under the key: the measured result is still the first.
        assert client.post("/v1/probes", json=body).status_code == 201
