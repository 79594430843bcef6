"""A typed client of the tuner HTTP API (docs/contract.md "HTTP API"). No torch.

Every call has a timeout; connection errors and 503 answers are retried with exponential
back-off; any other error answer becomes a `ServiceError` carrying the server's `detail`, `code`
and HTTP status. `create_plan` follows a 202 by polling the job until it finishes, with a progress
bar when stderr is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuner.errors import CLIENT_FAULT_CODES, ServiceError
from tuner.job_status import JOB_FAILED, JOB_QUEUED, JOB_SUCCEEDED, JobStatus
from tuner.results import Plan, ProbeResult
from tuner.spec import PlanRequest
from tuner.version import __version__

_M = TypeVar("_M", bound=BaseModel)


class Job(BaseModel):
    """A probe job (`GET /v1/jobs/{id}`); unknown fields the server adds are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: int | str
    status: JobStatus
    attempts: int = 0
    error: str | None = None
    """Why the job failed (only when `status` is `failed`)."""
    error_code: str | None = None
    """The failed job's machine code: the request's own mistake (`nothing_fits`, ...) or
    `probe_failed`."""
    plan_id: int | str | None = None
    """The plan the job produced for its first request (once `succeeded`)."""
    probe_id: int | str | None = None
    """The probe result the job stored (once `succeeded`)."""
    progress: Any = None
    """What the worker reports while running (a fraction, a count of trials, or a text)."""


class PlanPage(BaseModel):
    """`GET /v1/plans`: past plans, newest first, and how many match in all."""

    items: list[Plan] = Field(default_factory=list)
    total: int = 0


class TunerClient:
    """The tuner HTTP API, typed.

    `token` is sent as `Authorization: Bearer <token>` (needed for writes when the server sets
    `TUNER_API_TOKEN`). `timeout` bounds each request (a waiting `POST /v1/plans?wait=S` gets
    `S` more); `retries` is how many times a connection error or a 503 is retried, waiting
    `backoff × 2^n` seconds (or the server's `Retry-After`) in between.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        poll_interval: float = 1.0,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.poll_interval = poll_interval
        headers = {"User-Agent": f"tuner-client/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TunerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: liveness with the server's database check."""
        body: dict[str, Any] = self._request("GET", "/healthz").json()
        return body

    def submit_plan(
        self, request: PlanRequest, *, wait: float = 0, queue_without_worker: bool = False
    ) -> Plan | Job:
        """`POST /v1/plans?wait=S` without polling: the Plan when the server has it within `wait`
        seconds (a cache hit answers at once), else the queued `Job` of the 202.

        A request no live worker of the service could probe is refused (`ServiceError` with code
        `no_worker`, status 409) unless `queue_without_worker`, which queues it for a worker that
        starts later."""
        params = {"wait": _format_wait(wait)}
        if queue_without_worker:
            params["queue_without_worker"] = "true"
        response = self._request(
            "POST",
            "/v1/plans",
            params=params,
            json=request.model_dump(mode="json", exclude_none=True),
            timeout=self._timeout + wait,
        )
        if response.status_code == 202:
            return _parse(Job, response, "job")
        return _parse(Plan, response, "plan")

    def create_plan(
        self,
        request: PlanRequest,
        *,
        wait: float = 0,
        max_seconds: float | None = None,
        progress: bool | None = None,
        queue_without_worker: bool = False,
        on_update: Callable[[Job], None] | None = None,
    ) -> Plan:
        """`POST /v1/plans`, then, on a 202, poll `GET /v1/jobs/{id}` until the job finishes.

        `wait`: seconds the server may hold the first request (0–300). `max_seconds`: give up
        polling after this long (None: wait for the job however long it takes). `progress`: show a
        progress bar on stderr (None: only when stderr is a terminal). `queue_without_worker`: as
        in `submit_plan`. `on_update(job)`: called at every poll too (e.g. to log the job's state
        where no terminal shows the bar). A failed job raises `ServiceError` with the job's error
        and code (`nothing_fits`, ...); a job past `max_seconds` raises one with code `job_timeout`.

        A job is shared by every request for the same probes, so once it succeeds the request is
        sent again: the server answers it from the probes now cached, with this request's own
        plan (or the reason it has none).
        """
        submitted = self.submit_plan(request, wait=wait, queue_without_worker=queue_without_worker)
        if isinstance(submitted, Plan):
            return submitted
        show = sys.stderr.isatty() if progress is None else progress
        with _JobProgress(request.workload.describe(), enabled=show) as bar:

            def updated(job: Job) -> None:
                bar.update(job)
                if on_update is not None:
                    on_update(job)

            job = self.wait_for_job(submitted, max_seconds=max_seconds, on_update=updated)
        if request.device is None and job.probe_id is not None:
            # A request for whichever GPU a worker has: plan it for the device that was probed.
            request = request.model_copy(update={"device": self.get_probe(job.probe_id).device})
        answered = self.submit_plan(request, wait=0, queue_without_worker=queue_without_worker)
        if isinstance(answered, Plan):
            # A probe ran for this request: not a cache hit for the caller that waited.
            return answered.model_copy(update={"cache_hit": False})
        if job.plan_id is not None:
            return self.get_plan(job.plan_id)
        raise ServiceError(
            f"Job {job.id} succeeded, but the plan request is still waiting on job {answered.id}.",
            code="bad_response",
        )

    def wait_for_job(
        self,
        job: Job,
        *,
        max_seconds: float | None = None,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll a job until it succeeds (returned) or fails (`ServiceError` with the job's error
        code: `nothing_fits`, `model_build_failed`, ... for the request's own mistakes, with
        status 422; `probe_failed` otherwise)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        interval = min(0.2, self.poll_interval)
        while True:
            if on_update is not None:
                on_update(job)
            if job.status == JOB_SUCCEEDED:
                return job
            if job.status == JOB_FAILED:
                raise _job_failure(job)
            if deadline is not None and time.monotonic() + interval > deadline:
                raise ServiceError(
                    f"Job {job.id} was still {job.status} after {max_seconds:g} s.", code="job_timeout"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, self.poll_interval)
            job = self.get_job(job.id)

    def get_plan(self, plan_id: int | str) -> Plan:
        """`GET /v1/plans/{id}`."""
        return _parse(Plan, self._request("GET", f"/v1/plans/{plan_id}"), "plan")

    def list_plans(
        self,
        limit: int = 50,
        offset: int = 0,
        *,
        fingerprint: str | None = None,
        device_name: str | None = None,
        model: str | None = None,
    ) -> PlanPage:
        """`GET /v1/plans`: past plans, newest first, filtered by the given fields."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for key, value in (("fingerprint", fingerprint), ("device_name", device_name), ("model", model)):
            if value is not None:
                params[key] = value
        return _parse(PlanPage, self._request("GET", "/v1/plans", params=params), "plan list")

    def get_job(self, job_id: int | str) -> Job:
        """`GET /v1/jobs/{id}`."""
        return _parse(Job, self._request("GET", f"/v1/jobs/{job_id}"), "job")

    def get_probe(self, probe_id: int | str) -> ProbeResult:
        """`GET /v1/probes/{id}`: one probe result with every trial."""
        return _parse(ProbeResult, self._request("GET", f"/v1/probes/{probe_id}"), "probe result")

    def upload_probe(self, result: ProbeResult) -> ProbeResult:
        """`POST /v1/probes`: store a probe measured elsewhere; returns it with its id."""
        body = result.model_dump(mode="json", exclude={"id", "created_at"})
        return _parse(ProbeResult, self._request("POST", "/v1/probes", json=body), "probe result")

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        for attempt in range(self.retries + 1):
            final = attempt == self.retries
            try:
                response = self._http.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    timeout=self._timeout if timeout is None else timeout,
                )
            except httpx.TransportError as exc:
                if final:
                    raise ServiceError(
                        f"Cannot reach the tuner service at {self.base_url} "
                        f"({type(exc).__name__}: {exc or 'no detail'}) after {attempt + 1} attempt(s).",
                        code="service_unreachable",
                    ) from exc
                delay = self.backoff * 2**attempt
            else:
                if response.status_code != 503 or final:
                    _raise_for_error(response, method, path)
                    return response
                delay = max(self.backoff * 2**attempt, _retry_after(response))
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")


class _JobProgress:
    """A rich progress bar on stderr that follows a job's status and progress."""

    def __init__(self, what: str, *, enabled: bool) -> None:
        self.what = what
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _JobProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=progress_console(),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(f"planning {self.what}", total=None)
        return self

    def update(self, job: Job) -> None:
        if self._progress is None:
            return
        fraction, text = _describe_progress(job.progress)
        state = "waiting for a worker" if job.status == JOB_QUEUED else job.status
        description = f"planning {self.what}: job {job.id} {state}" + (f" ({text})" if text else "")
        if fraction is None:
            self._progress.update(self._task, description=description)
        else:
            self._progress.update(self._task, description=description, total=1.0, completed=fraction)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_console() -> Any:
    """Where the job's progress bar is drawn: stderr (a function, so that a test can look)."""
    from rich.console import Console

    return Console(stderr=True)


def _describe_progress(progress: Any) -> tuple[float | None, str]:
    """A job's `progress`, whatever shape the server gives it, as (fraction or None, text): the
    worker's trial report reads `checkpointing off: 3 trials, last b=48 fits`."""
    if isinstance(progress, bool) or progress is None:
        return None, ""
    if isinstance(progress, Mapping) and "trials" in progress and "gradient_checkpointing" in progress:
        choice = "on" if progress["gradient_checkpointing"] else "off"
        text = f"checkpointing {choice}: {progress['trials']} trials"
        if progress.get("last_batch_size") is not None:
            verdict = "fits" if progress.get("ok") else "does not fit"
            text += f", last b={progress['last_batch_size']} {verdict}"
        return None, text
    if isinstance(progress, int | float):
        return (float(progress), "") if 0 <= progress <= 1 else (None, f"{progress:g}")
    if isinstance(progress, Mapping):
        fraction = progress.get("fraction")
        text = ", ".join(f"{k} {v}" for k, v in progress.items() if k != "fraction")
        return (float(fraction) if isinstance(fraction, int | float) else None), text
    return None, str(progress)


def _job_failure(job: Job) -> ServiceError:
    """The error of a failed job: its own sentence and code where the request was at fault (as
    `POST /v1/plans?wait=` answers it: 422), else `probe_failed` with what the job last said."""
    if job.error_code in CLIENT_FAULT_CODES:
        return ServiceError(job.error or "The probe job failed.", status_code=422, code=job.error_code)
    return ServiceError(
        f"Job {job.id} failed after {job.attempts} attempt(s): {job.error or 'no reason given'}",
        status_code=503,
        code=job.error_code or "probe_failed",
    )


def _format_wait(wait: float) -> str:
    if not 0 <= wait <= 300:
        raise ValueError(f"wait must be between 0 and 300 seconds, got {wait}")
    return f"{wait:g}"


def _retry_after(response: httpx.Response) -> float:
    """The server's `Retry-After` in seconds (capped at a minute), 0 when absent."""
    try:
        return min(float(response.headers.get("Retry-After", "0")), 60.0)
    except ValueError:
        return 0.0


def _raise_for_error(response: httpx.Response, method: str, path: str) -> None:
    if response.status_code < 400:
        return
    detail, code = None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw = body.get("detail")
        detail = raw if isinstance(raw, str) else (None if raw is None else str(raw))
        code = body.get("code") if isinstance(body.get("code"), str) else None
    message = detail or f"{method} {path} answered HTTP {response.status_code} {response.reason_phrase}."
    raise ServiceError(message, status_code=response.status_code, code=code or f"http_{response.status_code}")


def _parse(model: type[_M], response: httpx.Response, what: str) -> _M:
    try:
        return model.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise ServiceError(
            f"The tuner service answered {response.request.method} {response.request.url.path} "
            f"with something that is not a {what}: {exc}",
            status_code=response.status_code,
            code="bad_response",
        ) from None
