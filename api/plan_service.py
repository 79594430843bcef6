"""What `POST /v1/plans` does, so that the router stays thin (DESIGN.md §2).

1. Validate the body (`tuner.spec.parse_plan_request`): anything wrong is a 422 naming the field.
2. The checkpointing choices the policy needs (`off` → [False], `on` → [True], `auto` → both).
3. Look up the cached probe of each choice by (fingerprint, device name, device memory, backend,
   torch minor, checkpointing). The torch minor is the installed torch's version, read from the
   package metadata without importing torch (`TUNER_TORCH_MINOR` overrides it).
4. Every probe cached → `derive_plan`: the stored plan of the same identity (the unique
   `plans.request_hash` of the canonical request JSON and the probe ids, `storage.identity`), or a
   new plan from `tuner.planner.make_plan`, stored atomically (replicas racing on one request
   store one row and all answer with it). A new effective batch or world size on a probed
   workload is therefore planned without probing.
5. Otherwise enqueue ONE job per (cache key, set of checkpointing choices), joined by every
   request that needs the same probes, add the request as a waiter, and wait up to `wait` seconds
   for the job (polling the database every 100 ms): succeeded → derive the plan; failed → the
   job's error; still running → 202 with the job.

A `cuda` request without a device cannot be looked up (the device is only known once a worker
claims the job): it always goes through a job that any cuda worker may claim; the worker finds
probes already cached for its device and finishes quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import anyio.to_thread
from sqlalchemy.orm import Session, sessionmaker

from api.cache import ResponseCache, body_key
from api.errors import CLIENT_FAULT_CODES, STATUS_BY_CODE, JobFailedError, MalformedJSONError
from api.metrics import ApiMetrics
from api.schemas import JobOut
from storage import repository
from storage.records import JobRecord
from tuner.errors import DeviceRequiredError, TunerError
from tuner.planner import make_plan, per_rank_batch
from tuner.results import Plan, ProbeResult
from tuner.spec import PlanRequest, parse_plan_request

POLL_SECONDS = 0.1
"""How often a waiting request looks at its job."""
MAX_WAIT_SECONDS = 300.0

T = TypeVar("T")


def installed_torch_minor() -> str:
    """`2.13` for an installed torch 2.13.1+cu126, read from the package metadata (torch is never
    imported by the API); `unknown` where torch is not installed."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "unknown"
    return repository.torch_minor(version)


def checkpointing_choices(request: PlanRequest) -> list[bool]:
    """The checkpointing choices the request's policy needs a probe for, off first."""
    return {"off": [False], "on": [True], "auto": [False, True]}[request.policy.gradient_checkpointing]


def canonical_request(request: PlanRequest) -> dict[str, Any]:
    """The request with every default filled in: what is stored with a plan and compared."""
    data: dict[str, Any] = request.model_dump(mode="json")
    return data


def request_hash(request: PlanRequest) -> str:
    """SHA-256 of the canonical request JSON (sorted keys, no whitespace): the key that plans
    identical requests in flight in one process once. The stored plan's identity
    (`storage.identity.plan_request_hash`) adds the probe ids."""
    text = json.dumps(canonical_request(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cached_probes(
    session: Session, *, request: PlanRequest, torch_minor: str
) -> dict[bool, ProbeResult] | None:
    """The cached probe of every checkpointing choice the request needs, or None if one is missing
    (or the request names no device, so nothing can be looked up)."""
    if request.device is None:
        return None
    probes: dict[bool, ProbeResult] = {}
    for checkpointing in checkpointing_choices(request):
        probe = repository.find_cached_probe(
            session,
            fingerprint=request.workload.fingerprint(),
            device_name=request.device.name,
            device_memory_bytes=request.device.total_memory_bytes,
            backend=request.backend,
            torch_minor=torch_minor,
            gradient_checkpointing=checkpointing,
            alloc_conf=request.alloc_conf,
        )
        if probe is None:
            return None
        probes[checkpointing] = probe
    return probes


def derive_plan(
    session: Session,
    *,
    request: PlanRequest,
    torch_minor: str,
    cache_hit: bool = True,
    waiter_id: int | None = None,
) -> Plan | None:
    """The plan for `request` from cached probes, or None when a probe it needs is not cached.

    The plan stored for the same request and probes (`repository.find_plan_by_request`) is
    returned with `cache_hit` true; otherwise `make_plan` derives a new one, which is saved (and
    committed) with `cache_hit` as given: true when no probe ran for this request, false when a
    worker derives the plan of a request that waited on its probe. Saving is insert-or-return-
    existing: when another process stored the same plan meanwhile, that one is returned (with
    `cache_hit` true) and no second row is made. With `waiter_id`, that waiter is resolved to the
    plan (the new one or the stored one), so that every waiter of a job with the same request
    gets the same plan. Torch-free: the worker calls it too. The request must name
    its device (a worker fills in its own for a device-less cuda request).
    Raises the planner's `PlanError`/`NothingFitsError` when the probes allow no plan.
    """
    probes = cached_probes(session, request=request, torch_minor=torch_minor)
    if probes is None:
        return None
    canonical = canonical_request(request)
    probe_ids = {("on" if gc else "off"): probe.id for gc, probe in probes.items() if probe.id is not None}
    earlier = repository.find_plan_by_request(
        session, request_hash=repository.plan_request_hash(canonical, probe_ids)
    )
    if earlier is not None and earlier.id is not None:
        if waiter_id is not None:
            repository.resolve_waiter(session, waiter_id=waiter_id, plan_id=earlier.id)
        return earlier.model_copy(update={"cache_hit": True})
    plan = make_plan(request, probes).model_copy(update={"cache_hit": cache_hit})
    plan_id, created = repository.save_plan_or_existing(
        session, plan=plan, request=canonical, waiter_id=waiter_id
    )
    stored = repository.get_plan(session, plan_id=plan_id)
    return stored if created else stored.model_copy(update={"cache_hit": True})


def job_key(request: PlanRequest, torch_minor: str) -> str:
    """One job per probe cache key and set of checkpointing choices; `*` stands for any device."""
    device = request.device
    parts = [
        request.workload.fingerprint(),
        device.name if device else "*",
        str(device.total_memory_bytes) if device else "*",
        request.backend,
        torch_minor,
        ",".join("on" if gc else "off" for gc in checkpointing_choices(request)),
        request.alloc_conf or "",
    ]
    return "|".join(parts)


def job_payload(request: PlanRequest, torch_minor: str) -> dict[str, Any]:
    """What the worker reads: the workload, device, backend, checkpointing choices, torch minor and
    allocator setting."""
    return {
        "workload": request.workload.model_dump(mode="json"),
        "device": request.device.model_dump(mode="json") if request.device else None,
        "backend": request.backend,
        "gradient_checkpointing": checkpointing_choices(request),
        "torch_minor": torch_minor,
        "alloc_conf": request.alloc_conf,
    }


def job_plan_id(session: Session, *, job_id: int) -> int | None:
    """The plan derived for the job's first waiting request, once there is one."""
    waiters = repository.list_waiters(session, job_id=job_id)
    return waiters[0].plan_id if waiters else None


def job_out(job: JobRecord, plan_id: int | None) -> JobOut:
    """The API's view of a job record."""
    payload = job.payload or {}
    return JobOut(
        id=job.id,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        plan_id=plan_id,
        probe_id=job.probe_id,
        progress=job.progress,
        backend=job.backend,
        device_name=job.device_name,
        device_memory_bytes=job.device_memory_bytes,
        gradient_checkpointing=list(payload.get("gradient_checkpointing", [])),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        location=f"/v1/jobs/{job.id}",
        plan_location=f"/v1/plans/{plan_id}" if plan_id is not None else None,
    )


def job_error(job: JobRecord) -> TunerError:
    """The error a failed job gives its waiters: the client's own mistake (the worker stores such
    errors as `<code>: <sentence>`, e.g. `model_build_failed: ...`) keeps its code and is a 4xx;
    anything else is the service's failure (503)."""
    text = job.error or "The probe job failed without a message."
    code, sep, message = text.partition(": ")
    if sep and code in CLIENT_FAULT_CODES:
        error = TunerError(message)
        error.code = code
        return error
    return JobFailedError(f"The probe job {job.id} failed after {job.attempts} attempt(s): {text}")


@dataclass(frozen=True)
class Answer:
    """What the router sends: a status, a JSON body already serialized, extra headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


class PlanService:
    """The `POST /v1/plans` flow of one API process."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        cache: ResponseCache,
        metrics: ApiMetrics,
        torch_minor: str,
        max_attempts: int,
    ) -> None:
        self.sessions = sessions
        self.cache = cache
        self.metrics = metrics
        self.torch_minor = torch_minor
        self.max_attempts = max_attempts
        # Identical requests in flight in this process are planned once; the others then find
        # the stored plan instead of deriving a duplicate.
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def cached_answer(self, raw_body: bytes) -> bytes | None:
        """The stored response of an identical earlier body, without parsing it (the fast path)."""
        found = self.cache.get(body_key(raw_body))
        if found is not None:
            self.metrics.cache_hit(memory=True)
        return found

    async def create(self, raw_body: bytes, *, wait: float) -> Answer:
        request = parse_body(raw_body)
        if request.backend == "estimate" and request.device is None:
            raise DeviceRequiredError(
                "The estimate backend needs a device: give device.name and device.total_memory_bytes "
                '(e.g. {"name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 85017493504}).'
            )
        # An impossible split is the client's mistake: say so before queueing a probe for it.
        per_rank_batch(request.effective_batch_size, request.world_size)
        async with self._single_flight(request_hash(request)):
            plan = await self._in_thread(self._derive, request)
        if plan is not None:
            self.metrics.cache_hit(memory=False)
            body = plan.model_dump_json().encode()
            self.cache.put(body_key(raw_body), body)
            return Answer(200, body)
        self.metrics.cache_miss()
        job = await self._in_thread(self._enqueue, request)
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        while job.status not in ("succeeded", "failed") and time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            job = await self._in_thread(self._get_job, job.id)
        if job.status == "succeeded":
            plan = await self._in_thread(self._derive_after_job, request, job)
            if plan is not None:
                self.cache.put(
                    body_key(raw_body), plan.model_copy(update={"cache_hit": True}).model_dump_json().encode()
                )
                # A probe ran for this request: not a cache hit for the client that waited.
                return Answer(200, plan.model_copy(update={"cache_hit": False}).model_dump_json().encode())
        if job.status == "failed":
            raise job_error(job)
        plan_id = await self._in_thread(self._job_plan_id, job.id)
        out = job_out(job, plan_id)
        return Answer(202, out.model_dump_json().encode(), {"Location": out.location})

    @contextlib.asynccontextmanager
    async def _single_flight(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    def _derive(self, request: PlanRequest) -> Plan | None:
        with self.sessions() as session:
            return derive_plan(session, request=request, torch_minor=self.torch_minor)

    def _derive_after_job(self, request: PlanRequest, job: JobRecord) -> Plan | None:
        with self.sessions() as session:
            if request.device is None and job.probe_id is not None:
                # A device-less cuda request: plan for the device the worker probed.
                probe = repository.get_probe(session, probe_id=job.probe_id)
                request = request.model_copy(update={"device": probe.device})
            return derive_plan(session, request=request, torch_minor=self.torch_minor, cache_hit=False)

    def _enqueue(self, request: PlanRequest) -> JobRecord:
        with self.sessions() as session:
            # The waiter is stored in the same transaction as the join: the job cannot finish
            # between the two and leave this request unplanned.
            job, _created = repository.enqueue_or_join(
                session,
                key=job_key(request, self.torch_minor),
                payload=job_payload(request, self.torch_minor),
                max_attempts=self.max_attempts,
                waiter=canonical_request(request),
            )
            return job

    def _get_job(self, job_id: int) -> JobRecord:
        with self.sessions() as session:
            return repository.get_job(session, job_id=job_id)

    def _job_plan_id(self, job_id: int) -> int | None:
        with self.sessions() as session:
            return job_plan_id(session, job_id=job_id)


def parse_body(raw_body: bytes) -> PlanRequest:
    """The plan request in a raw body: 422 `invalid_json` for what is not JSON, 422
    `invalid_spec` naming every bad field for JSON that does not validate."""
    if not raw_body.strip():
        raise MalformedJSONError("The request body is empty; send a plan request as JSON.")
    try:
        data = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise MalformedJSONError(f"The request body is not valid JSON{where}.") from None
    if not isinstance(data, dict):
        raise MalformedJSONError(f"The request body must be a JSON object, got {type(data).__name__}.")
    return parse_plan_request(data)


__all__ = [
    "STATUS_BY_CODE",
    "Answer",
    "PlanService",
    "cached_probes",
    "canonical_request",
    "checkpointing_choices",
    "derive_plan",
    "installed_torch_minor",
    "job_key",
    "job_payload",
    "parse_body",
    "request_hash",
]
