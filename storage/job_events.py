"""Signals that jobs ended, for whoever waits on them: in this process, and across processes.

A job ends (`succeeded` or `failed`) in one transaction of `storage.jobs`: `complete_job`, the
final `fail_job`, or `requeue_expired` when the last attempt's lease ran out. That transaction
signals the end two ways, which mean the same thing ("these jobs may have ended: look"):

- **PostgreSQL, every process**: `pg_notify('tuner_job_finished', '<job id>')` inside the
  transaction (`notify_finished`). PostgreSQL delivers it at commit, to every connection that
  ran `LISTEN tuner_job_finished` on that database, and never for a transaction rolled back.
  `listen_finished` listens on a connection of its own, outside the engine's pool.
- **This process, either database**: after the commit, `publish_finished` calls every callback
  registered with `subscribe_finished` (from the committing thread; callbacks must be quick and
  thread-safe). SQLite has no NOTIFY: a waiter in another process finds the end by polling.

A signal is a hint, never the state: the receiver reads the job's row (`storage.jobs.
finished_jobs`). A notification lost on the way (a listener that was reconnecting, a job ended
by hand in SQL) is therefore covered by whoever polls, later.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from storage.db import is_postgresql

JOB_FINISHED_CHANNEL = "tuner_job_finished"
"""The PostgreSQL channel a job's end is notified on; the payload is the job's id."""

FinishedCallback = Callable[[Sequence[int]], None]

_subscribers: list[FinishedCallback] = []
_subscribers_lock = threading.Lock()


def notify_finished(db: Session, job_ids: Iterable[int]) -> None:
    """Inside the transaction that ends the jobs: notify PostgreSQL listeners (at commit).
    Nothing to do on SQLite, whose waiters in other processes poll."""
    if not is_postgresql(db):
        return
    for job_id in job_ids:
        db.execute(select(func.pg_notify(JOB_FINISHED_CHANNEL, str(job_id))))


def publish_finished(job_ids: Sequence[int]) -> None:
    """After the commit that ended the jobs: tell this process's subscribers."""
    if not job_ids:
        return
    with _subscribers_lock:
        subscribers = list(_subscribers)
    for callback in subscribers:
        callback(job_ids)


def subscribe_finished(callback: FinishedCallback) -> Callable[[], None]:
    """Call `callback(job_ids)` whenever a transaction in this process ends jobs; returns the
    function that unsubscribes it."""
    with _subscribers_lock:
        _subscribers.append(callback)

    def unsubscribe() -> None:
        with _subscribers_lock:
            if callback in _subscribers:
                _subscribers.remove(callback)

    return unsubscribe


async def listen_finished(
    engine: Engine, *, on_listening: Callable[[], None] | None = None
) -> AsyncIterator[int]:
    """The ids of jobs that end from now on, as PostgreSQL notifies them (any process, any
    replica sharing the database): one `LISTEN` on a connection of its own, not the pool's.

    `on_listening` is called once `LISTEN` is in place: an end committed before that was not
    heard, so that is when a listener should look at the jobs it cares about. The iterator ends
    with the connection's error when the connection is lost; the caller reconnects (and looks
    again). PostgreSQL only.
    """
    import psycopg

    if not is_postgresql(engine):
        raise ValueError("LISTEN/NOTIFY needs PostgreSQL")
    _args, params = engine.dialect.create_connect_args(engine.url)
    params = {key: value for key, value in params.items() if key != "context"}
    connection = await psycopg.AsyncConnection.connect(
        autocommit=True, application_name="tuner-listen", connect_timeout=10, **params
    )
    try:
        await connection.execute(f"LISTEN {JOB_FINISHED_CHANNEL}")
        if on_listening is not None:
            on_listening()
        async for notification in connection.notifies():
            job_id = _job_id(notification.payload)
            if job_id is not None:
                yield job_id
    finally:
        await connection.close()


def _job_id(payload: Any) -> int | None:
    try:
        return int(payload)
    except (TypeError, ValueError):
        return None
