"""`parallelism` through the HTTP API (real uvicorn, SQLite and PostgreSQL): bad values are a
422 naming the field, and a cached FSDP probe answers only its own world size."""

from __future__ import annotations

from typing import Any

import pytest

from storage import repository
from tests.integration.api.conftest import Server, error_of
from tests.integration.api.seeding import mlp_workload, plan_request, probe_result
from tuner.parallelism import ParallelismSpec, ParallelSetup

RESNET = {"model": {"family": "torchvision", "name": "resnet18"}, "inputs": {"kind": "image"}}


@pytest.mark.parametrize(
    ("parallelism", "workload", "message"),
    [
        ({"strategy": "zero3"}, None, "parallelism.strategy: Input should be 'none', 'ddp' or 'fsdp'"),
        ({"strategy": "fsdp", "bucket_cap_mb": 5}, None, "parallelism.bucket_cap_mb is a ddp option"),
        ({"strategy": "fsdp"}, RESNET, "'fsdp' needs a model of repeated blocks"),
    ],
)
def test_bad_parallelism_is_a_422_naming_the_field(
    server: Server, parallelism: dict[str, Any], workload: dict[str, Any] | None, message: str
) -> None:
    body = {**plan_request(), "world_size": 8, "parallelism": parallelism}
    if workload is not None:
        body["workload"] = workload
    with server.authorized() as client:
        response = client.post("/v1/plans", json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert message in error["detail"] and error["code"] == "invalid_spec"


def test_an_fsdp_probe_answers_its_world_size_and_the_plan_names_it(server: Server) -> None:
    workload = mlp_workload(hidden_dim=71)
    fsdp = ParallelismSpec(strategy="fsdp", param_dtype="bf16")
    key = ParallelSetup(parallelism=fsdp, world_size=8).probe_key
    memory = {"parameters": 1, "gradients": 2, "buckets": 0, "optimizer_state": 3, "activations": 4}
    for checkpointing in (False, True):
        seeded = probe_result(workload, checkpointing=checkpointing)
        update = {"parallelism": key, "extra": {**seeded.extra, "memory_per_rank": memory}}
        repository.save_probe(server.engine, result=seeded.model_copy(update=update))
    body = {
        **plan_request(workload, effective_batch_size=64),
        "world_size": 8,
        "parallelism": fsdp.model_dump(mode="json"),
    }
    with server.authorized() as client:
        planned = client.post("/v1/plans", json=body)
        assert planned.status_code == 200, planned.text
        plan = planned.json()
        assert plan["parallelism"] == {
            "strategy": "fsdp",
            "reshard_after_forward": True,
            "param_dtype": "bf16",
        }
        assert plan["memory_per_rank"]["optimizer_state"] == 3
        assert plan["micro_batch_size"] * plan["accumulation_steps"] * 8 == 64
        page = client.get(f"/ui/plans/{plan['id']}")
        assert page.status_code == 200 and "FSDP × 8 (bf16 parameters)" in page.text
        # Sixteen ranks hold another share: not this probe (queued for a worker, none here).
        other = client.post(
            "/v1/plans", params={"queue_without_worker": "true", "wait": 0}, json={**body, "world_size": 16}
        )
        assert other.status_code == 202, other.text
