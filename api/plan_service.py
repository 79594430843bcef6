"""What `POST /v1/plans` does, so that the router stays thin (docs/design.md).

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
   for the job: succeeded → the plan; failed → the job's error; still running → 202 with the job.
   Waiting costs O(jobs), not O(requests): every request of this process waiting on one job
   awaits one future of the process's `JobWatcher` (`api.job_watch`), woken when the job ends,
   holding neither a thread nor a database connection; once it ends, identical requests share
   one derivation of their plan, which also resolves their waiter rows still pending.

Identical requests arriving together (the ranks of one fleet job) are also looked up and queued
together: one cache lookup and one transaction storing all their waiters per batch, however
many ranks the batch holds.

Database work runs in worker threads, at most as many at once as the engine's pool has
connections: a herd larger than the pool queues on the event loop, not on the pool.

A `cuda` request without a device cannot be looked up (the device is only known once a worker
claims the job): it always goes through a job that any cuda worker may claim; the worker finds
probes already cached for its device and finishes quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.cache import ResponseCache, body_key
from api.errors import STATUS_BY_CODE, JobFailedError, MalformedJSONError
from api.job_watch import JobWatcher
from api.metrics import ApiMetrics
from api.schemas import JobOut
from api.worker_availability import job_worker_available, require_live_worker
from storage import repository
from storage.db import connection_capacity
from storage.planning import (
    cached_probes,
    canonical_request,
    derive_plan,
    installed_torch_minor,
    job_key,
    job_payload,
)
from storage.records import JobRecord
from tuner.errors import CLIENT_FAULT_CODES, DeviceRequiredError, TunerError, client_fault_error
from tuner.intake import refuse_what_cannot_fit
from tuner.job_payload import JobPayload
from tuner.job_status import FINISHED_JOB_STATUSES
from tuner.plan_probes import checkpointing_choices
from tuner.planner import per_rank_batch
from tuner.results import Plan
from tuner.spec import PlanRequest, parse_plan_request

MAX_WAIT_SECONDS = 300.0

T = TypeVar("T")


def request_hash(request: PlanRequest) -> str:
    """SHA-256 of the canonical request JSON (sorted keys, no whitespace): the key that plans
    identical requests in flight in one process once. The stored plan's identity
    (`storage.identity.plan_request_hash`) adds the probe ids."""
    text = json.dumps(canonical_request(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def job_plan_id(session: Session, *, job_id: int) -> int | None:
    """The plan derived for the job's first request that got one, once there is one."""
    waiters = repository.list_waiters(session, job_id=job_id)
    return next((waiter.plan_id for waiter in waiters if waiter.plan_id is not None), None)


def job_out(job: JobRecord, plan_id: int | None, worker_available: bool | None = None) -> JobOut:
    """The API's view of a job record (`worker_available`: for a queued job, whether a live worker
    could claim it)."""
    return JobOut(
        id=job.id,
        status=job.status,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=job.error,
        error_code=job_error_code(job),
        plan_id=plan_id,
        probe_id=job.probe_id,
        worker_available=worker_available,
        progress=job.progress,
        backend=job.backend,
        device_name=job.device_name,
        device_memory_bytes=job.device_memory_bytes,
        gradient_checkpointing=_checkpointing_choices(job),
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        location=f"/v1/jobs/{job.id}",
        plan_location=f"/v1/plans/{plan_id}" if plan_id is not None else None,
    )


def _checkpointing_choices(job: JobRecord) -> list[bool]:
    try:
        return list(JobPayload.model_validate(job.payload).gradient_checkpointing)
    except ValidationError:
        # A payload this version cannot read (written by another version, or a workload that no
        # longer validates) is the worker's to refuse; the job itself is still shown.
        return []


def job_view(session: Session, job: JobRecord) -> JobOut:
    """`job_out` with what only the database knows: the job's plan and whether a worker is live."""
    return job_out(job, job_plan_id(session, job_id=job.id), job_worker_available(session, job))


def job_error(job: JobRecord) -> TunerError:
    """The error a failed job gives its waiters: the client's own mistake (the job's `error_code`,
    e.g. `nothing_fits`) keeps its code and is a 4xx; anything else is the service's failure (503)."""
    message = job.error or "The probe job failed without a message."
    if job.error_code in CLIENT_FAULT_CODES:
        return client_fault_error(job.error_code, message)
    return JobFailedError(f"The probe job {job.id} failed after {job.attempts} attempt(s): {message}")


def job_error_code(job: JobRecord) -> str | None:
    """The machine code of a failed job's error (`nothing_fits`, or `probe_failed` for a failure
    of the service); None unless the job failed."""
    if job.status != "failed":
        return None
    return job_error(job).code


@dataclass(frozen=True)
class Answer:
    """What the router sends: a status, a JSON body already serialized, extra headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


_Arrived = tuple[Plan | None, JobRecord | None, list[int]]
"""What a batch of identical arrivals found: the cached plan, or the job and their waiter ids."""


@dataclass
class _Arrival:
    """Identical plan requests that arrived together, looked up and queued in one go."""

    request: PlanRequest
    future: asyncio.Future[_Arrived]
    queue_without_worker: bool = False
    """Queue the job even when no live worker can run it (`?queue_without_worker=true`)."""
    count: int = 0


@dataclass(frozen=True)
class _Planned:
    """A plan derived after its job, serialized once for all the requests that share it."""

    plan: Plan
    waited_body: bytes
    """What a request that waited for the probe gets (`cache_hit` false)."""
    cached_body: bytes
    """What the in-memory cache answers later identical bodies with (`cache_hit` true)."""


@dataclass
class _SharedDerivation:
    """The plan of one request after its job, derived once for every identical waiting request
    of this process: the task, and the waiter rows it resolves when it starts."""

    waiter_ids: list[int]
    started: bool = False
    task: asyncio.Task[_Planned | None] | None = None


class PlanService:
    """The `POST /v1/plans` flow of one API process."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        *,
        cache: ResponseCache,
        metrics: ApiMetrics,
        torch_minor: str,
        max_attempts: int,
        job_poll_seconds: float | None = None,
        allowed_factory_packages: frozenset[str] = frozenset(),
    ) -> None:
        self.sessions = sessions
        self.allowed_factory_packages = allowed_factory_packages
        """The packages a `python` factory may come from (the app's setting, checked at intake)."""
        self.cache = cache
        self.metrics = metrics
        self.torch_minor = torch_minor
        self.max_attempts = max_attempts
        # No more threads on the database at once than the pool has connections: the rest of a
        # herd waits on the event loop, holding nothing, instead of on the pool's timeout.
        self._database_threads = anyio.CapacityLimiter(connection_capacity(engine))
        self.watcher = JobWatcher(
            engine,
            sessions,
            run_sync=self._in_thread,
            poll_seconds=job_poll_seconds,
            on_check=metrics.job_watch_check,
        )
        # Identical requests arriving together are looked up and queued in one go, and planned
        # once after their job (below); later ones find the stored plan.
        self._arrivals: dict[str, _Arrival] = {}
        self._settling: dict[str, asyncio.Task[None]] = {}
        self._after_job: dict[tuple[int, str], _SharedDerivation] = {}

    def cached_answer(self, raw_body: bytes) -> bytes | None:
        """The stored response of an identical earlier body, without parsing it (the fast path)."""
        found = self.cache.get(body_key(raw_body))
        if found is not None:
            self.metrics.cache_hit(memory=True)
        return found

    async def create(self, raw_body: bytes, *, wait: float, queue_without_worker: bool = False) -> Answer:
        request = parse_body(raw_body, allowed_factory_packages=self.allowed_factory_packages)
        if request.backend == "estimate" and request.device is None:
            raise DeviceRequiredError(
                "The estimate backend needs a device: give device.name and device.total_memory_bytes "
                '(e.g. {"name": "NVIDIA H100 80GB HBM3", "total_memory_bytes": 85017493504}).'
            )
        # An impossible split, or a card too small for the parameters alone, is the client's
        # mistake: say so before queueing a probe for it.
        per_rank_batch(request.effective_batch_size, request.world_size)
        refuse_what_cannot_fit(request)
        key = request_hash(request)
        arrived = await self._arrive(key, request, queue_without_worker=queue_without_worker)
        if isinstance(arrived, Plan):
            self.metrics.cache_hit(memory=False)
            body = arrived.model_dump_json().encode()
            self.cache.put(body_key(raw_body), body)
            return Answer(200, body)
        self.metrics.cache_miss()
        job, waiter_id = arrived
        wait = min(max(wait, 0.0), MAX_WAIT_SECONDS)
        if job.status not in FINISHED_JOB_STATUSES and wait > 0:
            ended = await self.watcher.wait(job.id, timeout=wait)
            # Still running: read it once more, for the 202's progress (or an end just now).
            job = ended if ended is not None else await self._in_thread(self._get_job, job.id)
        if job.status == "succeeded":
            planned = await self._plan_after_job(job, request, key, waiter_id)
            if planned is not None:
                self.cache.put(body_key(raw_body), planned.cached_body)
                # A probe ran for this request: not a cache hit for the client that waited.
                return Answer(200, planned.waited_body)
        if job.status == "failed":
            raise job_error(job)
        out = await self._in_thread(self._job_view, job)
        return Answer(202, out.model_dump_json().encode(), {"Location": out.location})

    async def close(self) -> None:
        """Stop the job watcher (app shutdown)."""
        await self.watcher.close()

    async def _plan_after_job(
        self, job: JobRecord, request: PlanRequest, key: str, waiter_id: int
    ) -> _Planned | None:
        """The plan of `request` once its job succeeded, derived once for all identical requests
        of this process that waited on the job (they wake together), each waiter row resolved."""
        shared = self._after_job.get((job.id, key))
        if shared is None or (shared.task is not None and shared.task.done()):
            shared = _SharedDerivation(waiter_ids=[waiter_id])
            self._after_job[(job.id, key)] = shared
            shared.task = asyncio.get_running_loop().create_task(self._derive_shared(shared, request, job))
            shared.task.add_done_callback(lambda _task: self._forget_derivation(job.id, key, shared))
            joined = True
        else:
            joined = not shared.started
            if joined:
                shared.waiter_ids.append(waiter_id)
        assert shared.task is not None
        try:
            planned = await asyncio.shield(shared.task)
        except TunerError as exc:
            if not joined:
                await self._in_thread(self._fail_waiters, [waiter_id], exc)
            raise
        if not joined and planned is not None and planned.plan.id is not None:
            # Came after the shared derivation had started: resolve this waiter on its own.
            await self._in_thread(self._resolve_waiters, [waiter_id], planned.plan.id)
        return planned

    def _forget_derivation(self, job_id: int, key: str, shared: _SharedDerivation) -> None:
        if self._after_job.get((job_id, key)) is shared:
            del self._after_job[(job_id, key)]

    async def _derive_shared(
        self, shared: _SharedDerivation, request: PlanRequest, job: JobRecord
    ) -> _Planned | None:
        # The requests that woke with this one join before this first step runs.
        await asyncio.sleep(0)
        shared.started = True
        return await self._in_thread(self._derive_after_job, request, job, list(shared.waiter_ids))

    async def _arrive(
        self, key: str, request: PlanRequest, *, queue_without_worker: bool = False
    ) -> Plan | tuple[JobRecord, int]:
        """The cached plan of `request`, or the job it now waits on and its waiter's id.

        Identical requests (same `key`) that arrive together are handled together: one look at
        the cache and, on a miss, one transaction that joins the job and stores all their
        waiters. One batch per key is in flight at a time; requests arriving meanwhile form the
        next, which therefore finds whatever the previous one stored (a plan is derived once).
        Requests that may queue without a live worker batch apart from those that may not."""
        if queue_without_worker:
            key = f"{key}|queue_without_worker"
        batch = self._arrivals.get(key)
        if batch is None:
            batch = _Arrival(
                request=request,
                future=asyncio.get_running_loop().create_future(),
                queue_without_worker=queue_without_worker,
            )
            self._arrivals[key] = batch
            asyncio.get_running_loop().create_task(self._settle(key, batch))
        index = batch.count
        batch.count += 1
        plan, job, waiter_ids = await asyncio.shield(batch.future)
        if plan is not None:
            return plan
        assert job is not None
        return job, waiter_ids[index]

    async def _settle(self, key: str, batch: _Arrival) -> None:
        """Look up or enqueue one batch of identical arrivals, after the key's previous batch."""
        this = asyncio.current_task()
        previous = self._settling.get(key)
        assert this is not None
        self._settling[key] = this
        try:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            else:
                await asyncio.sleep(0)  # requests read in the same turn of the loop join
            if self._arrivals.get(key) is batch:
                del self._arrivals[key]  # later arrivals form the next batch
            result = await self._in_thread(
                self._plan_or_enqueue, batch.request, batch.count, batch.queue_without_worker
            )
        except asyncio.CancelledError:
            batch.future.cancel()  # the app is shutting down: so are the requests waiting here
            raise
        except Exception as exc:
            batch.future.set_exception(exc)
        else:
            batch.future.set_result(result)
        finally:
            if self._settling.get(key) is this:
                del self._settling[key]

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._database_threads)

    def _plan_or_enqueue(
        self, request: PlanRequest, count: int, queue_without_worker: bool = False
    ) -> _Arrived:
        """The cached plan of `request`; else join (or create) its job with `count` waiters,
        stored in the same transaction as the join, so that the job cannot finish between the
        two and leave a request unplanned. A job no live worker would claim is refused
        (`NoWorkerError`) unless `queue_without_worker`: it would wait forever, silently."""
        with self.sessions() as session:
            plan = derive_plan(session, request=request, torch_minor=self.torch_minor)
            if plan is not None:
                return plan, None, []
            if not queue_without_worker:
                require_live_worker(session, request)
            job, _created, waiter_ids = repository.enqueue_waiters(
                session,
                key=job_key(request, self.torch_minor),
                payload=job_payload(request, self.torch_minor).stored(),
                max_attempts=self.max_attempts,
                requests=[canonical_request(request)] * count,
            )
            return None, job, waiter_ids

    def _derive_after_job(
        self, request: PlanRequest, job: JobRecord, waiter_ids: list[int]
    ) -> _Planned | None:
        """The plan after the job, with the waiters resolved to it (those the job's worker did not
        resolve already: a waiter that joined after the worker read them), or failed with the
        reason when the probes allow no plan."""
        with self.sessions() as session:
            if request.device is None and job.probe_id is not None:
                # A device-less cuda request: plan for the device the worker probed.
                probe = repository.get_probe(session, probe_id=job.probe_id)
                request = request.model_copy(update={"device": probe.device})
            try:
                plan = derive_plan(session, request=request, torch_minor=self.torch_minor, cache_hit=False)
            except TunerError as exc:
                repository.fail_waiters(
                    session, waiter_ids=waiter_ids, error=exc.message, error_code=exc.client_fault_code
                )
                raise
            if plan is None or plan.id is None:
                return None
            repository.resolve_waiters(session, waiter_ids=waiter_ids, plan_id=plan.id)
            return _Planned(
                plan=plan,
                waited_body=plan.model_copy(update={"cache_hit": False}).model_dump_json().encode(),
                cached_body=plan.model_copy(update={"cache_hit": True}).model_dump_json().encode(),
            )

    def _resolve_waiters(self, waiter_ids: list[int], plan_id: int) -> None:
        with self.sessions() as session:
            repository.resolve_waiters(session, waiter_ids=waiter_ids, plan_id=plan_id)

    def _fail_waiters(self, waiter_ids: list[int], error: TunerError) -> None:
        with self.sessions() as session:
            repository.fail_waiters(
                session, waiter_ids=waiter_ids, error=error.message, error_code=error.client_fault_code
            )

    def _get_job(self, job_id: int) -> JobRecord:
        with self.sessions() as session:
            return repository.get_job(session, job_id=job_id)

    def _job_view(self, job: JobRecord) -> JobOut:
        with self.sessions() as session:
            return job_view(session, job)


def parse_body(raw_body: bytes, *, allowed_factory_packages: frozenset[str] = frozenset()) -> PlanRequest:
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
    return parse_plan_request(data, allowed_factory_packages=allowed_factory_packages)


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
