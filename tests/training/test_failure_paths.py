"""Failure paths that end, through the real service (uvicorn, an estimate worker, SQLite): a plan
that cannot fit fails its job with the reason, which pollers and `create_plan` get; a card too
small for the parameters alone is answered at intake; `tuner plan --server` shows the job's
progress while it waits."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from rich.console import Console

import tuner.client
from tests.integration.api.seeding import plan_request
from tests.training.conftest import Service, unique_number
from tuner.cli.plan import _plan_on_server
from tuner.client import TunerClient
from tuner.errors import ServiceError
from tuner.spec import DeviceSpec, PlanRequest, WorkloadSpec, parse_plan_request, parse_workload

GIB = 1 << 30


def wide_mlp() -> WorkloadSpec:
    """An MLP whose parameters alone (4 × 4096² floats with gradients and AdamW state, ~1 GiB)
    fill a 1 GiB card: not even one sample fits. Its own width keeps it apart from other tests."""
    return parse_workload(
        {
            "model": {
                "family": "builtin",
                "name": "mlp",
                "kwargs": {"hidden_dim": 4096 + unique_number(), "num_layers": 4},
            },
            "inputs": {"kind": "features", "dim": 4096, "num_classes": 10},
            "precision": "fp32",
        }
    )


def request_on(workload: WorkloadSpec, device: DeviceSpec) -> PlanRequest:
    return parse_plan_request(
        plan_request(
            workload, effective_batch_size=64, device=device, backend="estimate", checkpointing="off"
        )
    )


def test_a_plan_that_cannot_fit_fails_its_job_with_what_one_sample_needs(service: Service) -> None:
    device = DeviceSpec(name=f"Small GPU {unique_number()}", total_memory_bytes=2 * GIB)
    request = request_on(wide_mlp(), device)
    with TunerClient(service.url, token=service.token, poll_interval=0.1) as client:
        submitted = client.submit_plan(request)
        assert not isinstance(submitted, tuner.client.Plan)
        # A poller that follows docs/api.md sees the job end.
        deadline = time.monotonic() + 120
        job = client.get_job(submitted.id)
        while job.status in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get_job(submitted.id)
        assert job.status == "failed" and job.error_code == "nothing_fits", job
        assert job.plan_id is None
        with pytest.raises(ServiceError) as caught:
            client.create_plan(request, progress=False)
    error = caught.value
    assert (error.code, error.status_code) == ("nothing_fits", 422)
    assert "not even a micro-batch of 1 fits" in error.message
    assert "it needs" in error.message and "of reserved memory (estimated)" in error.message
    assert "the card leaves the allocator after the CUDA context" in error.message
    # The same request asked with `?wait=` gets the same 422 straight away.
    answer = httpx.post(
        f"{service.url}/v1/plans",
        params={"wait": 30},
        json=request.model_dump(mode="json"),
        headers={"Authorization": f"Bearer {service.token}"},
        timeout=60,
    )
    assert answer.status_code == 422 and answer.json()["code"] == "nothing_fits", answer.text


def test_a_card_smaller_than_the_cuda_context_says_so(service: Service) -> None:
    device = DeviceSpec(name=f"Tiny GPU {unique_number()}", total_memory_bytes=512 << 20)
    with (
        TunerClient(service.url, token=service.token, poll_interval=0.1) as client,
        pytest.raises(ServiceError) as caught,
    ):
        client.create_plan(request_on(wide_mlp(), device), wait=30, progress=False)
    assert caught.value.code == "nothing_fits"
    assert (
        "less than the CUDA context" in caught.value.message and "512.00 MiB in all" in caught.value.message
    )


def test_a_card_too_small_for_the_parameters_alone_is_refused_at_intake(service: Service) -> None:
    llama_7b = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    }
    body = {
        "workload": {
            "model": {"family": "transformers", "config": llama_7b},
            "inputs": {"kind": "tokens", "seq_len": 2048},
        },
        "effective_batch_size": 64,
        "device": {"name": f"NVIDIA GeForce RTX 4060 {unique_number()}", "total_memory_bytes": 8 * GIB},
        "backend": "estimate",
    }
    started = time.monotonic()
    answer = httpx.post(
        f"{service.url}/v1/plans", json=body, headers={"Authorization": f"Bearer {service.token}"}, timeout=30
    )
    assert time.monotonic() - started < 5  # no probe ran
    assert answer.status_code == 422 and answer.json()["code"] == "nothing_fits", answer.text
    detail = answer.json()["detail"]
    assert (
        "at least 1.57 billion parameters" in detail and "more than the memory budget of 7.60 GiB" in detail
    )


def test_plan_with_server_shows_the_jobs_progress_while_it_waits(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        tuner.client, "progress_console", lambda: Console(file=screen, force_terminal=True, width=240)
    )
    monkeypatch.setenv("TUNER_API_TOKEN", service.token)
    workload = parse_workload(
        {
            "model": {
                "family": "builtin",
                "name": "mlp",
                "kwargs": {"hidden_dim": 512 + unique_number(), "num_layers": 2},
            },
            "inputs": {"kind": "features", "dim": 64},
            "precision": "fp32",
        }
    )
    request = request_on(
        workload, DeviceSpec(name=f"Progress GPU {unique_number()}", total_memory_bytes=4 * GIB)
    )
    plan, _, _ = _plan_on_server(service.url, request, 120, with_trials=False, show_progress=True)
    assert plan.effective_batch_size == 64 and plan.cache_hit is False
    drawn = screen.getvalue()
    assert "planning mlp: job" in drawn
    assert "checkpointing off:" in drawn and " trials" in drawn, drawn[-2000:]
