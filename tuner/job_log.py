"""A plan's job, told in log lines where no terminal shows its progress bar.

A training script's stderr is usually a file: `plan_for` waiting on a server's probe job then
logs each change of the job's state (`tuner` logger, INFO: queued, running with its trial count,
done) and warns once when the job has waited for a worker longer than `QUEUED_WARNING_SECONDS`
(a warning reaches stderr even where logging is not configured).
"""

from __future__ import annotations

import logging
import time

from tuner.client import Job, _describe_progress
from tuner.job_status import JOB_QUEUED

__all__ = ["QUEUED_WARNING_SECONDS", "JobLog"]

QUEUED_WARNING_SECONDS = 60.0
"""How long a job may wait for a worker before the log says so."""

logger = logging.getLogger("tuner")


class JobLog:
    """`on_update` for `TunerClient.create_plan`: one line per change of the job's state."""

    def __init__(self, what: str, *, url: str) -> None:
        self.what = what
        self.url = url
        self._last: tuple[str, str] | None = None
        self._queued_since: float | None = None
        self._warned = False

    def __call__(self, job: Job) -> None:
        _, text = _describe_progress(job.progress)
        state = (job.status, text)
        if state != self._last:
            self._last = state
            detail = f" ({text})" if text else ""
            logger.info("planning %s: job %s %s%s", self.what, job.id, job.status, detail)
        if job.status != JOB_QUEUED:
            self._queued_since = None
            return
        now = time.monotonic()
        self._queued_since = self._queued_since or now
        if not self._warned and now - self._queued_since >= QUEUED_WARNING_SECONDS:
            self._warned = True
            logger.warning(
                "planning %s: job %s has waited %.0f s and no worker of %s has claimed it; is one "
                "running for this device and backend? (GET %s/v1/jobs/%s)",
                self.what, job.id, now - self._queued_since, self.url, self.url.rstrip("/"), job.id,
            )  # fmt: skip
