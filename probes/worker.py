"""The worker loop: claim a probe job, probe, store, derive the waiting plans, complete.

One worker serves one backend on one device. A cuda worker claims only jobs for its own GPU (same
name and memory) or jobs that name no device; an estimate worker claims every estimate job,
whatever device it names. Many workers on many machines share one database: claims are leases
(`storage.jobs`), renewed by a heartbeat thread while the probe runs in a child process.

Failures: an error the client's spec causes (a model that does not build, an estimate that
cannot trace it, a workload of which not even one sample fits the card) fails the job at once,
its code stored in the job's own `error_code` column (`tuner.errors.TunerError.client_fault`),
which the API gives its waiters as a 422; a job whose probes succeeded but none of whose
requests could be planned fails the same way, with the first request's reason, so that nobody
polls a job that names no plan. A crash or hang of the probe child is retried with backoff until
the job's attempts are spent. The worker itself lives on. On SIGTERM/SIGINT it stops claiming,
lets the current job finish within a grace period, else releases it to the queue.
A worker whose lease was lost (a heartbeat refused) abandons its result: another worker owns it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from types import FrameType
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from probes.child import child_traceback
from storage import repository
from storage.db import session_factory
from storage.planning import derive_plan, installed_torch_minor
from storage.records import Accepts, JobRecord, WaiterRecord
from tuner.checkpointing import on_off
from tuner.errors import DeviceRequiredError, ModelBuildError, NothingFitsError, SpecError, TunerError
from tuner.job_payload import JobPayload, parse_job_payload
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.probe_key import ProbeKey
from tuner.results import ProbeResult
from tuner.settings import DEFAULT_ESTIMATE_TIMEOUT_SECONDS, DEFAULT_PROBE_TIMEOUT_SECONDS
from tuner.spec import (
    Backend,
    DeviceSpec,
    PlanRequest,
    StepKind,
    WorkloadSpec,
    parse_plan_request,
)

log = logging.getLogger("tuner.worker")


def new_worker_id(backend: str, device_name: str | None = None) -> str:
    """Unique per process and readable in `GET /v1/jobs`: host, pid, backend (and the device a
    worker was given). `tuner serve` finds its own worker's row by the `:<pid>:` in it."""
    suffix = f":{device_name}" if device_name else ""
    return f"{socket.gethostname()}:{os.getpid()}:{backend}{suffix}"


class ProbeRunner(Protocol):
    """`probes.probe.run_probe`'s signature: what the worker calls for one checkpointing choice."""

    def __call__(
        self,
        spec: WorkloadSpec,
        *,
        backend: Backend,
        device: DeviceSpec,
        gradient_checkpointing: bool,
        timeout: float = ...,
        prior_timeout: float = ...,
        progress: Callable[[Any], None] | None = None,
        alloc_conf: str | None = None,
        step: StepKind = "train",
        allocator_hint: bool | None = None,
        parallel: ParallelSetup = SINGLE,
    ) -> ProbeResult: ...


def _default_probe_runner() -> ProbeRunner:
    # Imported when first needed: the orchestrator pulls in the probe machinery.
    from probes.probe import run_probe

    runner: ProbeRunner = run_probe
    return runner


class _LeaseGone(Exception):
    """The job is no longer this worker's (lease lost, or released on shutdown)."""


@dataclass
class _ActiveJob:
    """A claimed job and what the threads working on it share."""

    job: JobRecord
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held for every write about the job, so that abandoning it and finishing it never interleave."""
    abandoned: bool = False
    """True once the job is not ours: no more writes about it."""
    finished: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] = field(default_factory=dict)
    reported: threading.Event = field(default_factory=threading.Event)
    """Set when a trial finished: the heartbeat stores the progress now instead of at its next beat."""
    unbuildable_checkpointing: str | None = None
    """Why the model cannot be built with checkpointing on, where the job's `auto` requests are
    planned without that choice (the `off` probe stands)."""

    @property
    def id(self) -> int:
        return self.job.id

    @cached_property
    def payload(self) -> JobPayload:
        """The job's payload, taken in as this worker runs it (`parse_job_payload`): a payload
        that does not validate is a `SpecError`, which fails the job at once."""
        return parse_job_payload(self.job.payload)


def is_client_fault(error: BaseException) -> bool:
    """True for an error that retrying cannot fix (the spec is at fault, `TunerError.client_fault`);
    False for a crash, a hang, or anything unexpected, which deserves another attempt."""
    return isinstance(error, TunerError) and error.client_fault


class Worker:
    """Claims and runs probe jobs for one backend and device until stopped."""

    def __init__(
        self,
        engine: Engine,
        *,
        backend: Backend,
        device: DeviceSpec | None,
        worker_id: str,
        lease_seconds: float = 60.0,
        heartbeat_seconds: float = 10.0,
        poll_seconds: float = 1.0,
        retry_backoff_seconds: float = 10.0,
        grace_seconds: float = 30.0,
        probe_timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
        estimate_timeout_seconds: float = DEFAULT_ESTIMATE_TIMEOUT_SECONDS,
        probe_runner: ProbeRunner | None = None,
    ) -> None:
        if backend == "cuda" and device is None:
            raise ValueError("a cuda worker needs its GPU as `device`")
        if heartbeat_seconds >= lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        self.backend: Backend = backend
        self.device = device
        """cuda: the local GPU. estimate: informational only (the job names the device)."""
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.retry_backoff_seconds = retry_backoff_seconds
        self.grace_seconds = grace_seconds
        self.probe_timeout_seconds = probe_timeout_seconds
        self.estimate_timeout_seconds = estimate_timeout_seconds
        self.torch_minor = installed_torch_minor()
        self._sessions = session_factory(engine)
        self._probe_runner = probe_runner
        self._stopping = threading.Event()
        self._announced_at: float | None = None

    # ------------------------------------------------------------------------------ the loop

    @property
    def accepts(self) -> Accepts:
        """The claim filter: a cuda worker its own GPU (or no device); estimate any device."""
        if self.backend == "cuda" and self.device is not None:
            return Accepts(
                backend="cuda",
                device_name=self.device.name,
                device_memory_bytes=self.device.total_memory_bytes,
            )
        return Accepts(backend=self.backend)

    def stop(self) -> None:
        """Stop claiming; the current job gets the grace period (what SIGTERM does)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run_forever(self) -> None:
        """Claim and run jobs until SIGTERM/SIGINT (or `stop()`); then return normally."""
        self._install_signal_handlers()
        device = f" for {self.device.name}" if self.device else ""
        log.info("Worker %s serving %s jobs%s.", self.worker_id, self.backend, device)
        try:
            while not self._stopping.is_set():
                try:
                    self.announce()
                    worked = self.run_once()
                except Exception:
                    # The database may be restarting or unreachable: keep the worker alive and retry.
                    log.exception("Worker %s could not reach the job queue; retrying.", self.worker_id)
                    worked = False
                if not worked:
                    self._stopping.wait(self.poll_seconds)
        finally:
            self.retire()
        log.info("Worker %s stopped.", self.worker_id)

    def announce(self, *, force: bool = False) -> None:
        """Tell the database this worker is up (`storage.workers`), at most once per heartbeat
        interval unless `force`: the API refuses jobs that no live worker could run."""
        now = time.monotonic()
        if not force and self._announced_at is not None and now - self._announced_at < self.heartbeat_seconds:
            return
        with self._session() as session:
            repository.announce_worker(
                session, worker_id=self.worker_id, accepts=self.accepts, ttl_seconds=self.lease_seconds
            )
        self._announced_at = now

    def retire(self) -> None:
        """Remove this worker from the live ones (it stops); a failure only logs: the row expires."""
        try:
            with self._session() as session:
                repository.retire_worker(session, worker_id=self.worker_id)
        except Exception as exc:
            log.warning("Worker %s could not retire its row (it expires by itself): %s", self.worker_id, exc)

    def run_once(self) -> bool:
        """Claim one job and run it to the end (or give it up); False when none was due."""
        if self._stopping.is_set():
            return False
        with self._session() as session:
            job = repository.claim_job(
                session,
                worker_id=self.worker_id,
                lease_seconds=self.lease_seconds,
                accepts=self.accepts,
            )
        if job is None:
            return False
        log.info(
            "Claimed job %d (attempt %d of %d): %s",
            job.id,
            job.attempts,
            job.max_attempts,
            _describe(job.payload),
        )
        self._run_claimed(_ActiveJob(job))
        return True

    def _run_claimed(self, active: _ActiveJob) -> None:
        runner = threading.Thread(target=self._process, args=(active,), name=f"job-{active.id}", daemon=True)
        beater = threading.Thread(
            target=self._heartbeat_loop, args=(active,), name=f"heartbeat-{active.id}", daemon=True
        )
        runner.start()
        beater.start()
        deadline: float | None = None
        try:
            while runner.is_alive():
                runner.join(0.2)
                if not runner.is_alive():
                    break
                if self._stopping.is_set() and deadline is None:
                    deadline = time.monotonic() + self.grace_seconds
                    log.info("Stopping: job %d may finish within %g s.", active.id, self.grace_seconds)
                if deadline is not None and time.monotonic() >= deadline:
                    self._give_up(active, release=True)
                    runner.join(15)
                    break
        finally:
            active.finished.set()
            active.reported.set()  # wakes the heartbeat thread, which then sees `finished`
            beater.join(5)

    # ------------------------------------------------------------------------------ one job

    def _process(self, active: _ActiveJob) -> None:
        """Probe every checkpointing choice not yet cached, derive the waiting plans, complete."""
        started = time.monotonic()
        try:
            probes = self._probe_all(active)
            if not probes:
                raise _BadJob("The job names no gradient-checkpointing choice to probe.")
            plan_ids, refusals = self._derive_waiting_plans(active)
            refusal = _job_refusal(probes, plan_ids, refusals)
            if refusal is not None:
                raise refusal
            probe_ids = [probe.id for probe in probes if probe.id is not None]
            with self._writing(active) as session:
                repository.complete_job(
                    session, job_id=active.id, worker_id=self.worker_id, probe_id=probe_ids[-1]
                )
            log.info(
                "Finished job %d in %.1f s: probes %s, plans %s.",
                active.id,
                time.monotonic() - started,
                probe_ids,
                plan_ids,
            )
        except _LeaseGone:
            log.warning("Job %d is no longer this worker's; its result was dropped.", active.id)
        except Exception as exc:
            if active.abandoned:
                log.info("Job %d was given up: %s", active.id, _message(exc))
                return
            self._fail(active, exc, seconds=time.monotonic() - started)

    def _probe_all(self, active: _ActiveJob) -> list[ProbeResult]:
        """The probe of every checkpointing choice the job names, each stored (with its id)."""
        payload = active.payload
        device = self._job_device(payload)
        parallel = payload.parallel  # a single process for a job queued before parallelism existed
        torch_minor = payload.torch_minor or self.torch_minor
        if torch_minor != self.torch_minor:
            log.warning(
                "Job %d was asked for torch %s but this worker has torch %s: the API will not find "
                "this probe in its cache. Run the same torch minor on API and workers.",
                active.id,
                torch_minor,
                self.torch_minor,
            )
        probes: list[ProbeResult] = []
        alloc_conf = payload.alloc_conf
        for checkpointing in payload.gradient_checkpointing:
            try:
                probes.append(
                    self._probe_one(
                        active, payload.workload, device, checkpointing, alloc_conf, "train", parallel
                    )
                )
            except ModelBuildError as exc:
                # Under `auto` a choice the model cannot be built with is one choice less, not a
                # failed job, once the `off` probe stands (as `plan_for` does locally).
                if not (checkpointing and probes):
                    raise
                log.info("Job %d: checkpointing on is dropped: %s", active.id, exc.message)
                active.unbuildable_checkpointing = exc.message
        # The eval probe and a token budget's lengths (`tuner.plan_probes`), after the train probes.
        for extra in payload.extra_probes:
            if extra.gradient_checkpointing and active.unbuildable_checkpointing is not None:
                continue  # a token budget's length probes of the choice that cannot be built
            self._probe_one(
                active,
                extra.workload,
                device,
                extra.gradient_checkpointing,
                alloc_conf,
                extra.step,
                parallel,
                extra_probe=True,
            )
        return probes

    def _probe_one(
        self,
        active: _ActiveJob,
        workload: WorkloadSpec,
        device: DeviceSpec,
        checkpointing: bool,
        alloc_conf: str | None,
        step: StepKind,
        parallel: ParallelSetup,
        *,
        extra_probe: bool = False,
    ) -> ProbeResult:
        """The cached probe of this key, or a new one, stored (with its id). An extra probe (eval,
        a token budget's length) skips the allocator alternative: the plan's hint comes from its
        train probes."""
        with self._session() as session:
            key = ProbeKey.of(
                workload,
                device,
                backend=self.backend,
                torch_minor=self.torch_minor,
                gradient_checkpointing=checkpointing,
                alloc_conf=alloc_conf,
                step=step,
                parallelism=parallel.probe_key,
            )
            cached = repository.find_cached_probe(session, key)
        if cached is not None and cached.id is not None:
            # A worker that lost this job earlier may have stored some probes already.
            return cached
        result = self._run_probe(
            active, workload, device, checkpointing, alloc_conf, step, extra_probe, parallel
        )
        with self._writing(active) as session:
            # Renew the lease first: a worker that lost it must not store a duplicate.
            if not repository.heartbeat(
                session, job_id=active.id, worker_id=self.worker_id, lease_seconds=self.lease_seconds
            ):
                active.abandoned = True
                raise _LeaseGone
            return result.model_copy(update={"id": repository.save_probe(session, result=result)})

    def _run_probe(
        self,
        active: _ActiveJob,
        workload: WorkloadSpec,
        device: DeviceSpec,
        checkpointing: bool,
        alloc_conf: str | None,
        step: StepKind = "train",
        extra_probe: bool = False,
        parallel: ParallelSetup = SINGLE,
    ) -> ProbeResult:
        active.progress = {"gradient_checkpointing": checkpointing, "trials": 0}

        def on_trial(trial: Any) -> None:
            # Read by the heartbeat thread, which stores it on the job for `GET /v1/jobs/{id}`.
            active.progress = {
                "gradient_checkpointing": checkpointing,
                "trials": int(active.progress.get("trials", 0)) + 1,
                "last_batch_size": getattr(trial, "batch_size", None),
                "ok": getattr(trial, "ok", None),
            }
            active.reported.set()

        if self._probe_runner is None:
            self._probe_runner = _default_probe_runner()
        # Only an extra probe passes `step` and `allocator_hint`: runners written before them
        # (tests' fakes) stay valid. No `search`: the runner's default, the full range, is what a
        # shared probe needs (every request with this key reuses it, whatever cap one of them has).
        by_step: dict[str, Any] = {"step": step, "allocator_hint": False} if extra_probe else {}
        return self._probe_runner(
            workload,
            backend=self.backend,
            device=device,
            gradient_checkpointing=checkpointing,
            timeout=self.probe_timeout_seconds,
            prior_timeout=self.estimate_timeout_seconds,
            progress=on_trial,
            alloc_conf=alloc_conf,
            **by_step,
            parallel=parallel,
        )

    def _job_device(self, payload: JobPayload) -> DeviceSpec:
        if payload.device is not None:
            return payload.device
        if self.device is None:
            # Only a cuda job may name no device (the API refuses estimate requests without one).
            raise _NoDevice("The job names no device and this estimate worker has none to offer.")
        return self.device

    def _derive_waiting_plans(self, active: _ActiveJob) -> tuple[list[int], list[TunerError]]:
        """Plan every request waiting on the job from the probes now cached: the plans made, and
        why each request that could not be planned could not. Identical requests (the ranks of
        one fleet job) are planned once and their waiters resolved together."""
        plan_ids: list[int] = []
        refusals: list[TunerError] = []
        with self._session() as session:
            waiters = repository.list_waiters(session, job_id=active.id, pending_only=True)
        for waiter, same in _identical_requests(waiters):
            if active.abandoned:
                raise _LeaseGone
            try:
                request = parse_plan_request(waiter.request)
                if request.device is None:
                    request = request.model_copy(update={"device": self._job_device(active.payload)})
                hints: list[str] = []
                if active.unbuildable_checkpointing is not None:
                    request, hints = without_checkpointing(request, active.unbuildable_checkpointing)
                with self._session() as session:
                    plan = derive_plan(
                        session,
                        request=request,
                        torch_minor=self.torch_minor,
                        cache_hit=False,
                        waiter_id=waiter.id,
                        hints=hints,
                    )
            except TunerError as exc:
                # The probe is stored and serves the cache; this one request cannot be planned.
                log.info("Job %d: waiter %d cannot be planned: %s", active.id, waiter.id, exc.message)
                with self._session() as session:
                    repository.fail_waiters(
                        session,
                        waiter_ids=[waiter.id, *same],
                        error=exc.message,
                        error_code=exc.client_fault_code,
                    )
                refusals.append(exc)
                continue
            if plan is not None and plan.id is not None:
                with self._session() as session:
                    repository.resolve_waiters(session, waiter_ids=same, plan_id=plan.id)
                plan_ids.extend([plan.id] * (1 + len(same)))
        return plan_ids, refusals

    def _fail(self, active: _ActiveJob, error: Exception, *, seconds: float) -> None:
        client_fault = is_client_fault(error)
        text = _message(error)
        error_code = error.client_fault_code if isinstance(error, TunerError) else None
        shown = f"{error_code}: {text}" if error_code else text
        if not isinstance(error, TunerError):
            log.exception("Job %d hit an unexpected error.", active.id, exc_info=error)
        trace = child_traceback(error)
        if trace is not None:
            log.info("Job %d: the probe child's traceback:\n%s", active.id, trace.rstrip())
        with self._writing(active) as session:
            updated = repository.fail_job(
                session,
                job_id=active.id,
                worker_id=self.worker_id,
                error=text,
                error_code=error_code,
                retry_backoff_seconds=self.retry_backoff_seconds,
                retry=not client_fault,
            )
        if updated is None:
            log.warning("Job %d failed after its lease was lost: %s", active.id, shown)
        elif updated.status == "failed":
            log.info(
                "Job %d failed after %.1f s (attempt %d): %s", active.id, seconds, updated.attempts, shown
            )
        else:
            log.info(
                "Job %d attempt %d failed after %.1f s; retrying after backoff: %s",
                active.id,
                updated.attempts,
                seconds,
                shown,
            )

    # ------------------------------------------------------------------------- lease keeping

    def _heartbeat_loop(self, active: _ActiveJob) -> None:
        # A beat every `heartbeat_seconds`, and one after each trial, so that pollers of
        # `GET /v1/jobs/{id}` (and `tuner plan --server`'s bar) see the trials as they finish.
        while True:
            active.reported.wait(self.heartbeat_seconds)
            active.reported.clear()
            if active.finished.is_set():
                return
            try:
                with active.lock:
                    if active.abandoned:
                        return
                    with self._session() as session:
                        held = repository.heartbeat(
                            session,
                            job_id=active.id,
                            worker_id=self.worker_id,
                            lease_seconds=self.lease_seconds,
                            progress=dict(active.progress),
                        )
                    # A long probe keeps the worker itself alive too.
                    self.announce()
            except Exception as exc:
                # A database hiccup: keep trying; the lease outlives a few missed beats.
                log.warning("Heartbeat for job %d failed: %s", active.id, _message(exc))
                continue
            if not held:
                log.warning("Lost the lease on job %d; abandoning it.", active.id)
                self._give_up(active, release=False)
                return

    def _give_up(self, active: _ActiveJob, *, release: bool) -> None:
        """Stop working on the job: release it to the queue (shutdown) or just drop it (lease
        lost), and stop the probe child so that the GPU is free."""
        with active.lock:
            if active.abandoned:
                return
            active.abandoned = True
            if release:
                try:
                    with self._session() as session:
                        released = repository.release_job(session, job_id=active.id, worker_id=self.worker_id)
                    log.info(
                        "Released job %d back to the queue%s.",
                        active.id,
                        "" if released else " (lease already lost)",
                    )
                except Exception as exc:
                    log.warning(
                        "Could not release job %d (its lease will expire): %s", active.id, _message(exc)
                    )
        # The probe children are this worker's own spawned processes; their results are unwanted.
        for child in multiprocessing.active_children():
            child.kill()

    # ------------------------------------------------------------------------------ plumbing

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def _writing(self, active: _ActiveJob) -> Iterator[Session]:
        """A session for a write about the job, or `_LeaseGone` once the job was given up."""
        with active.lock:
            if active.abandoned:
                raise _LeaseGone
            with self._session() as session:
                yield session

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            if not self._stopping.is_set():
                log.info(
                    "Received %s: finishing the current job, claiming no more.", signal.Signals(signum).name
                )
            self._stopping.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def _job_refusal(
    probes: list[ProbeResult], plan_ids: list[int], refusals: list[TunerError]
) -> TunerError | None:
    """The error the job must fail with although its probes succeeded, or None to complete it.

    A job that completes names a plan (`GET /v1/jobs/{id}`'s `plan_id`), which is what pollers
    wait for. When no waiting request could be planned, the first one's reason (`nothing_fits`,
    `plan_impossible`) becomes the job's; a job of which not one sample fits, whoever waits on
    it, fails with `nothing_fits` saying what a micro-batch of 1 needs against what the card
    offers."""
    if plan_ids:
        return None
    if refusals:
        return refusals[0] if refusals[0].client_fault else None
    if all(probe.max_batch_size == 0 for probe in probes):
        from tuner.planner import nothing_fits_message

        by_choice = {probe.gradient_checkpointing: probe for probe in probes}
        return NothingFitsError(nothing_fits_message(by_choice))
    return None


class _NoDevice(DeviceRequiredError):
    pass


class _BadJob(SpecError):
    pass


def _identical_requests(waiters: list[WaiterRecord]) -> list[tuple[WaiterRecord, list[int]]]:
    """The waiters grouped by identical request, oldest first: each group's first waiter and the
    ids of the others, which get the same plan (a plan is a function of its request and probes)."""
    groups: dict[str, tuple[WaiterRecord, list[int]]] = {}
    for waiter in waiters:
        text = json.dumps(waiter.request, sort_keys=True, separators=(",", ":"))
        if text in groups:
            groups[text][1].append(waiter.id)
        else:
            groups[text] = (waiter, [])
    return list(groups.values())


def _message(error: BaseException) -> str:
    return error.message if isinstance(error, TunerError) else f"{type(error).__name__}: {error}"


def _describe(data: dict[str, Any]) -> str:
    """`builtin mlp on Test GPU 1GiB, estimate, checkpointing [off]` for the claim log line."""
    try:
        payload = JobPayload.model_validate(data)
    except ValidationError:
        return "an unreadable payload"  # the job fails with the reason when it is run
    device = payload.device.name if payload.device is not None else "this worker's GPU"
    choices = ",".join(on_off(gc) for gc in payload.gradient_checkpointing)
    return f"{payload.workload.describe()} on {device}, {payload.backend}, checkpointing [{choices}]"


def without_checkpointing(request: PlanRequest, why: str) -> tuple[PlanRequest, list[str]]:
    """`request` planned without checkpointing on, which the model cannot be built with, and the
    hint that says so. A request that asked for `on` stays as it is: its plan fails, as asked."""
    policy = request.policy
    if policy.gradient_checkpointing != "auto":
        return request, []
    narrowed = request.model_copy(
        update={"policy": policy.model_copy(update={"gradient_checkpointing": "off"})}
    )
    return narrowed, [f"Checkpointing on was not considered: the model cannot be built with it ({why})."]
