"""How the requests of one API process wait for probe jobs: one watcher per job, not a poll loop
per request.

Every request waiting on job J awaits the same asyncio future, which the watcher resolves with
J's record once J has ended. A waiting request holds no thread and no database connection: it
is a coroutine parked on a future. The watcher looks at the jobs it watches (one query for all
of them, `storage.jobs.finished_jobs`) when it is told that some may have ended, and on a slow
poll besides:

- told by PostgreSQL: `LISTEN tuner_job_finished` on one connection of its own
  (`storage.job_events.listen_finished`); workers notify in the transaction that ends a job, so
  every replica hears it at commit;
- told by this process: a job ended by a transaction in this process (`subscribe_finished`);
- told by itself: a job it starts watching is looked at once at once (it may have ended before
  the watch began), and so are all of them when LISTEN is (re)established;
- the poll, every `poll_seconds`: on SQLite the way to hear of other processes' workers (0.5 s by
  default), on PostgreSQL the fallback for a notification lost on the way (5 s).

With N requests waiting on one job that is one query per wake-up and per poll, whatever N is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage import repository
from storage.db import is_postgresql
from storage.job_events import listen_finished, subscribe_finished
from storage.records import JobRecord

log = logging.getLogger("tuner.api.jobs")

SQLITE_POLL_SECONDS = 0.5
"""SQLite cannot notify other processes: the poll is how a worker's end of a job is heard."""
POSTGRES_POLL_SECONDS = 5.0
"""PostgreSQL notifies; the poll only covers a notification lost on the way."""
_RECONNECT_SECONDS = (0.5, 30.0)
"""First and longest pause before LISTEN is re-established after its connection was lost."""

T = TypeVar("T")
RunSync = Callable[..., Awaitable[Any]]
"""Runs a blocking database function in a worker thread: `await run_sync(fn, *args)`."""


@dataclass
class _Watch:
    """One watched job: the future its waiters share, and how many wait on it."""

    future: asyncio.Future[JobRecord]
    waiters: int = 0


class JobWatcher:
    """The job watcher of one API process (one per app)."""

    def __init__(
        self,
        engine: Engine,
        sessions: sessionmaker[Session],
        *,
        run_sync: RunSync,
        poll_seconds: float | None = None,
        listen: bool | None = None,
        on_check: Callable[[str], None] | None = None,
    ) -> None:
        """`poll_seconds` None: 0.5 s on SQLite, 5 s on PostgreSQL. `listen` None: LISTEN on
        PostgreSQL. `on_check(reason)` is called before every look at the watched jobs, with
        why: `watch`, `local`, `notify`, `listening` or `poll` (metrics, tests)."""
        postgresql = is_postgresql(engine)
        self.engine = engine
        self.sessions = sessions
        self.poll_seconds = poll_seconds or (POSTGRES_POLL_SECONDS if postgresql else SQLITE_POLL_SECONDS)
        self.listens = postgresql if listen is None else listen
        self._run_sync = run_sync
        self._on_check = on_check
        self._watches: dict[int, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._reasons: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._listening: asyncio.Event | None = None

    # ------------------------------------------------------------------------------ waiting

    async def wait(self, job_id: int, *, timeout: float) -> JobRecord | None:
        """The job's record once it has ended (`succeeded` or `failed`), or None after `timeout`
        seconds. Every caller waiting on one job shares one watch."""
        self._start()
        watch = self._watches.get(job_id)
        if watch is None:
            assert self._loop is not None
            watch = _Watch(self._loop.create_future())
            self._watches[job_id] = watch
            # It may have ended between the caller's read and now: look once, not at the poll.
            self._nudge("watch")
        watch.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                # Shielded: one caller timing out (or disconnecting) leaves the others waiting.
                return await asyncio.shield(watch.future)
        except TimeoutError:
            return None
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and self._watches.get(job_id) is watch:
                del self._watches[job_id]  # nobody waits: stop looking at it

    @property
    def watched_jobs(self) -> int:
        return len(self._watches)

    @property
    def waiting_requests(self) -> int:
        return sum(watch.waiters for watch in self._watches.values())

    async def listening(self) -> None:
        """Returns once LISTEN is in place (at once when this watcher does not listen)."""
        self._start()
        if self.listens:
            assert self._listening is not None
            await self._listening.wait()

    async def close(self) -> None:
        """Stop watching (app shutdown): the background tasks and the LISTEN connection end."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop = None

    # ------------------------------------------------------------------------------ watching

    def _start(self) -> None:
        """Start the background tasks in the running loop, on first use (and restart one that
        died, which `_look` and `_listen` are written never to do)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new loop (the old one ended, and its tasks and futures with it).
            for task in self._tasks:
                task.cancel()
            self._loop = loop
            self._wake = asyncio.Event()
            self._listening = asyncio.Event()
            self._watches = {}
            self._tasks = []
        if not self._tasks or self._tasks[0].done():
            self._tasks[:1] = [loop.create_task(self._look_when_woken(), name="job-watcher")]
        if self.listens and (len(self._tasks) < 2 or self._tasks[1].done()):
            self._tasks[1:] = [loop.create_task(self._listen(), name="job-watcher-listen")]
        if self._unsubscribe is None:
            self._unsubscribe = subscribe_finished(self._ended_in_this_process)

    def _nudge(self, reason: str) -> None:
        if self._wake is not None:
            self._reasons.add(reason)
            self._wake.set()

    async def _look_when_woken(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            if not self._watches:
                await wake.wait()  # nothing watched: no polling at all
            else:
                try:
                    async with asyncio.timeout(self.poll_seconds):
                        await wake.wait()
                except TimeoutError:
                    self._reasons.add("poll")
            wake.clear()
            reasons, self._reasons = self._reasons, set()
            if self._on_check is not None:
                for reason in sorted(reasons):
                    self._on_check(reason)
            await self._look()

    async def _look(self) -> None:
        """Resolve the futures of the watched jobs that have ended: one query for all."""
        job_ids = [job_id for job_id, watch in self._watches.items() if not watch.future.done()]
        if not job_ids:
            return
        try:
            ended: list[JobRecord] = await self._run_sync(self._read_ended, job_ids)
        except Exception as exc:
            # The database is away: the waiters keep waiting, and the next poll looks again.
            log.warning("Could not read the state of %d watched job(s): %s", len(job_ids), exc)
            return
        for job in ended:
            watch = self._watches.pop(job.id, None)
            if watch is not None and not watch.future.done():
                watch.future.set_result(job)

    def _read_ended(self, job_ids: Sequence[int]) -> list[JobRecord]:
        with self.sessions() as session:
            return repository.finished_jobs(session, job_ids=job_ids)

    # -------------------------------------------------------------------- being told of ends

    def _ended_in_this_process(self, job_ids: Sequence[int]) -> None:
        """A transaction in this process ended jobs (called from its thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._ended, tuple(job_ids), "local")

    def _ended(self, job_ids: Sequence[int], reason: str) -> None:
        if any(job_id in self._watches for job_id in job_ids):
            self._nudge(reason)

    async def _listen(self) -> None:
        """LISTEN for ends notified by any process; reconnect when the connection is lost."""
        assert self._listening is not None
        listening = self._listening
        pause = _RECONNECT_SECONDS[0]

        def established() -> None:
            nonlocal pause
            pause = _RECONNECT_SECONDS[0]
            listening.set()
            # Ends notified while nobody listened are lost: look at every watched job now.
            self._nudge("listening")

        while True:
            try:
                async for job_id in listen_finished(self.engine, on_listening=established):
                    self._ended((job_id,), "notify")
                log.warning("The LISTEN connection closed; re-establishing it.")
            except Exception as exc:
                log.warning(
                    "LISTEN for job ends failed (%s); retrying in %g s, polling every %g s meanwhile.",
                    exc,
                    pause,
                    self.poll_seconds,
                )
            listening.clear()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RECONNECT_SECONDS[1])
