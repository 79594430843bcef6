"""Real servers for tests and benchmarks: uvicorn and `tuner worker` subprocesses on a free port,
and throw-away PostgreSQL databases.

One place for what every server-backed test does the same way: pick a free port, start the
process with its output in a log file, wait until it answers, stop it with SIGTERM (SIGKILL when
it does not exit, and then the rest of its process group, where probe children live), and put the
log into the error when it fails to come up. It imports neither pytest nor torch, so that
`bench/api_latency.py` can use it with the repository root on `sys.path`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TUNER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
"""The maintenance database through which throw-away databases are made and dropped."""
TUNER = [sys.executable, "-c", "from tuner.cli import main; main()"]
"""`tuner …` with this interpreter, whatever the PATH holds."""
API_APP = ["--factory", "api.app:create_app"]
"""uvicorn's target for the tuner API."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# ------------------------------------------------------------------------------------ processes


def clean_env(env: Mapping[str, str] | None = None, *, token: str | None = None) -> dict[str, str]:
    """This process's environment with `env` on top; `TUNER_API_TOKEN` is `token` (unset for None),
    never whatever the caller's shell happened to export."""
    merged = {**os.environ, **(env or {})}
    merged.pop("TUNER_API_TOKEN", None)
    if token:
        merged["TUNER_API_TOKEN"] = token
    return merged


def launch(
    command: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """Start `command` with stdout and stderr appended to `log_path`, in a session of its own (so
    that `stop_process` can also reach the children it leaves behind)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; then SIGKILL whatever is left
    of its process group (probe children outlive a killed worker). Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return int(process.returncode)


@dataclass
class ServerProcess:
    """An HTTP server running in a subprocess."""

    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, *, timeout: float = 10.0) -> int:
        return stop_process(self.process, timeout=timeout)


def uvicorn_command(target: Sequence[str], port: int, *, log_level: str = "warning") -> list[str]:
    """`python -m uvicorn <target>` on 127.0.0.1:`port`, one process."""
    return [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", log_level]  # fmt: skip


def start_server(
    command: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str],
    log_path: Path,
    health_path: str = "/healthz",
    timeout: float = 60.0,
    cwd: Path = REPO,
) -> ServerProcess:
    """Run `command` (which must listen on `port`) and wait until `health_path` answers 200.
    A server that exits or does not answer within `timeout` is stopped, and the error carries its
    log."""
    server = ServerProcess(
        f"http://127.0.0.1:{port}", launch(command, env=env, log_path=log_path, cwd=cwd), log_path
    )
    try:
        wait_until_healthy(server, health_path=health_path, timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_until_healthy(
    server: ServerProcess, *, health_path: str = "/healthz", timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url(health_path), timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not answer within {timeout:g} s:\n{server.log()}")
        time.sleep(0.1)


def start_api_server(
    database_url: str,
    log_dir: Path,
    *,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    log_level: str = "warning",
    timeout: float = 60.0,
) -> ServerProcess:
    """The tuner API (`uvicorn --factory api.app:create_app`) on `database_url`, which it migrates
    at start; writes need `token` when one is given."""
    port = port or free_port()
    return start_server(
        uvicorn_command(API_APP, port, log_level=log_level),
        port=port,
        env=clean_env({**(env or {}), "TUNER_DATABASE_URL": database_url}, token=token),
        log_path=log_dir / f"api-{port}.log",
        timeout=timeout,
    )


@contextlib.contextmanager
def running_api_server(database_url: str, log_dir: Path, **options: Any) -> Iterator[ServerProcess]:
    """`start_api_server`, stopped on leaving the block."""
    server = start_api_server(database_url, log_dir, **options)
    try:
        yield server
    finally:
        server.stop()


def start_worker(
    database_url: str,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    backend: str = "estimate",
    wait_live: bool = True,
    timeout: float = 90.0,
) -> subprocess.Popen[bytes]:
    """A `tuner worker --backend <backend>` on `database_url`; stop it with `stop_process`. With
    `wait_live`, returns once the worker has announced itself (the API refuses plan requests that
    no live worker can run), or fails with its log."""
    process = launch(
        [*TUNER, "worker", "--backend", backend, "--db", database_url],
        env=clean_env({**(env or {}), "TUNER_DATABASE_URL": database_url}),
        log_path=log_path,
    )
    if wait_live:
        wait_for_live_worker(database_url, process, log_path=log_path, timeout=timeout)
    return process


def wait_for_live_worker(
    database_url: str, process: subprocess.Popen[bytes], *, log_path: Path, timeout: float = 90.0
) -> None:
    """Wait until the worker process `process` is among the database's live workers."""
    from storage import repository
    from storage.db import make_engine

    engine = make_engine(database_url)

    def announced() -> bool:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise AssertionError(f"the worker exited with {process.returncode} before going live:\n{log}")
        return any(f":{process.pid}:" in worker.worker_id for worker in repository.live_workers(engine))

    try:
        wait_until(announced, timeout=timeout, what=f"worker {process.pid} to go live", interval=0.2)
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------------- PostgreSQL


class PostgresAdmin:
    """Creates and drops throw-away databases through the maintenance database."""

    def __init__(self, admin_url: str = POSTGRES_ADMIN_URL) -> None:
        self.admin_url: URL = make_url(admin_url)
        self.admin = create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", pool_size=1, connect_args={"connect_timeout": 3}
        )

    def reachable(self) -> bool:
        try:
            with self.admin.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except OperationalError:
            return False

    def execute(self, statement: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(statement))

    def create(self, prefix: str, *, template: str | None = None) -> str:
        """A new database `<prefix>_<random>` (a copy of `template` when given); its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def describe(self) -> str:
        return self.admin_url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.admin.dispose()


def postgres_reachable(admin_url: str = POSTGRES_ADMIN_URL) -> bool:
    """Whether the PostgreSQL server answers (tests on it skip otherwise)."""
    admin = PostgresAdmin(admin_url)
    try:
        return admin.reachable()
    finally:
        admin.dispose()


@contextlib.contextmanager
def fresh_postgres_database(prefix: str, *, admin_url: str = POSTGRES_ADMIN_URL) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped (with any connections left) after."""
    admin = PostgresAdmin(admin_url)
    name = admin.create(prefix)
    try:
        yield admin.url(name)
    finally:
        admin.drop(name)
        admin.dispose()


@contextlib.contextmanager
def fresh_database(backend: str, directory: Path, *, prefix: str) -> Iterator[str]:
    """The URL of a new database: an SQLite file in `directory`, or a PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'tuner.db'}"
    elif backend == "postgresql":
        with fresh_postgres_database(prefix) as url:
            yield url
    else:
        raise ValueError(f"unknown database backend {backend!r}")
