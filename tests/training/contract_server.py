"""A small in-memory server that speaks CONTRACT.md's HTTP API, for the client's tests.

It runs under a real uvicorn on a free port, so the client is exercised over real HTTP:
real connection errors, real status codes, real headers. Its planner is deliberately simple
(micro-batch = min(per-rank batch, `max_micro`)); tests of plan *quality* live with the planner.
Knobs on `ContractState` make it answer 503, fail jobs, or demand a token.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tuner.errors import SpecError
from tuner.results import Plan, ProbeResult
from tuner.spec import parse_plan_request


@dataclass
class ContractState:
    token: str | None = None
    unavailable: int = 0
    """Answer this many requests with 503 (and Retry-After: 0) before serving."""
    fail_jobs_with: str | None = None
    polls_to_finish: int = 2
    """GETs of a job before it finishes (queued → running → ... → done)."""
    max_micro: int = 8
    plans: dict[int, Plan] = field(default_factory=dict)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    probes: dict[int, ProbeResult] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path with query, Authorization header) of every request."""
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _error(status: int, detail: str, code: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status)


def build_app(state: ContractState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Any:
        query = f"?{request.url.query}" if request.url.query else ""
        state.requests.append(
            (request.method, request.url.path + query, request.headers.get("authorization"))
        )
        if state.unavailable > 0:
            state.unavailable -= 1
            return JSONResponse(
                {"detail": "The service is starting.", "code": "unavailable"},
                status_code=503,
                headers={"Retry-After": "0"},
            )
        expected = f"Bearer {state.token}"
        if (
            request.method == "POST"
            and state.token is not None
            and request.headers.get("authorization") != expected
        ):
            return _error(401, "A valid bearer token is required for writes.", "unauthorized")
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "database": "ok"}

    @app.post("/v1/plans")
    async def create_plan(request: Request, wait: float = 0) -> Any:
        try:
            plan_request = parse_plan_request(await request.json())
        except SpecError as exc:
            return _error(422, exc.message, exc.code)
        if plan_request.device is None:
            return _error(422, "This backend needs a device.", "device_required")
        for plan in state.plans.values():
            same = plan.fingerprint == plan_request.workload.fingerprint()
            if same and plan.effective_batch_size == plan_request.effective_batch_size:
                return plan.model_copy(update={"cache_hit": True}).model_dump(mode="json")
        job_id = state.new_id()
        state.jobs[job_id] = {"request": plan_request, "polls": 0, "status": "queued", "plan_id": None}
        return JSONResponse(
            _job_body(job_id, state), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
        )

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: int) -> Any:
        job = state.jobs.get(job_id)
        if job is None:
            return _error(404, f"No job with id {job_id}.", "not_found")
        job["polls"] += 1
        if job["status"] in ("queued", "running"):
            job["status"] = "running"
            if job["polls"] >= state.polls_to_finish:
                if state.fail_jobs_with:
                    job["status"] = "failed"
                else:
                    job["plan_id"] = _make_plan(job["request"], state)
                    job["status"] = "succeeded"
        return _job_body(job_id, state)

    @app.get("/v1/plans")
    def list_plans(
        limit: int = 50,
        offset: int = 0,
        fingerprint: str | None = None,
        device_name: str | None = None,
        model: str | None = None,
    ) -> Any:
        plans = sorted(state.plans.values(), key=lambda p: p.id or 0, reverse=True)
        plans = [
            p
            for p in plans
            if (fingerprint is None or p.fingerprint == fingerprint)
            and (device_name is None or p.device.name == device_name)
            and (model is None or p.workload.describe() == model)
        ]
        return {
            "items": [p.model_dump(mode="json") for p in plans[offset : offset + limit]],
            "total": len(plans),
        }

    @app.get("/v1/plans/{plan_id}")
    def get_plan(plan_id: int) -> Any:
        plan = state.plans.get(plan_id)
        if plan is None:
            return _error(404, f"No plan with id {plan_id}.", "not_found")
        return plan.model_dump(mode="json")

    @app.post("/v1/probes")
    async def upload_probe(request: Request) -> Any:
        try:
            probe = ProbeResult.model_validate(await request.json())
        except ValueError as exc:
            return _error(422, f"Invalid probe result: {exc}", "invalid_spec")
        probe_id = state.new_id()
        stored = probe.model_copy(update={"id": probe_id, "created_at": datetime.now(UTC)})
        state.probes[probe_id] = stored
        return JSONResponse(stored.model_dump(mode="json"), status_code=201)

    @app.get("/v1/probes/{probe_id}")
    def get_probe(probe_id: int) -> Any:
        probe = state.probes.get(probe_id)
        if probe is None:
            return _error(404, f"No probe with id {probe_id}.", "not_found")
        return probe.model_dump(mode="json")

    return app


def _job_body(job_id: int, state: ContractState) -> dict[str, Any]:
    job = state.jobs[job_id]
    return {
        "id": job_id,
        "status": job["status"],
        "attempts": 1 if job["status"] != "queued" else 0,
        "error": state.fail_jobs_with if job["status"] == "failed" else None,
        "plan_id": job["plan_id"],
        "progress": {"trials": job["polls"]} if job["status"] == "running" else None,
    }


def _make_plan(request: Any, state: ContractState) -> int:
    per_rank = request.effective_batch_size // request.world_size
    micro = min(per_rank, state.max_micro)
    while per_rank % micro:
        micro -= 1
    plan_id = state.new_id()
    state.plans[plan_id] = Plan(
        id=plan_id,
        created_at=datetime.now(UTC),
        fingerprint=request.workload.fingerprint(),
        workload=request.workload,
        device=request.device,
        backend=request.backend,
        effective_batch_size=request.effective_batch_size,
        world_size=request.world_size,
        micro_batch_size=micro,
        accumulation_steps=per_rank // micro,
        gradient_checkpointing=False,
        max_micro_batch_size={"off": state.max_micro},
        memory_budget_bytes=request.device.total_memory_bytes,
        predicted_peak_bytes=None,
    )
    return plan_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(state: ContractState) -> Iterator[str]:
    """Run the contract server under uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the contract server did not start within 10 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
