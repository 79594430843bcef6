"""`tuner serve` (docs/contract.md): the HTTP API in this process, plus one local worker process.

This process never imports torch: the local worker is a child process (`tuner worker --backend
auto`) that decides for itself whether a GPU is present. The child is restarted when it dies and
stopped, gracefully, when the server stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import typer

from tuner.cli._common import clear_errors

if TYPE_CHECKING:
    from tuner.settings import Settings

log = logging.getLogger("tuner.serve")

# A worker that ran at least this long before dying is restarted at once; one that keeps dying
# young is restarted with a growing delay, so that a broken setup does not spin.
_HEALTHY_RUN_SECONDS = 60.0
_MAX_RESTART_DELAY_SECONDS = 30.0
_WORKER_START_SECONDS = 120.0
"""How long the API waits for the local worker to announce itself before serving anyway."""


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    db: str | None = typer.Option(
        None, "--db", help="Database URL (default: TUNER_DATABASE_URL, sqlite:///./tuner.db)."
    ),
    no_worker: bool = typer.Option(
        False, "--no-worker", help="API only (a replica in front of shared workers)."
    ),
) -> None:
    """Serve the HTTP API and run a local worker (cuda when a GPU is present, else estimate)."""
    logging.basicConfig(
        level=os.environ.get("TUNER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic logs every plugin and migration step at INFO on each start; its warnings still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with clear_errors():
        from tuner.settings import get_settings

        settings = get_settings()
        if db is not None:
            # Passed on, not written into the environment: the app gets these settings, the
            # worker child its `--db`.
            settings = settings.model_copy(update={"database_url": db})
        _migrate(settings.database_url)
        local_worker = None
        if not no_worker:
            local_worker = LocalWorker(
                grace_seconds=settings.shutdown_grace_seconds, database_url=settings.database_url
            )
        if local_worker is not None:
            local_worker.start()
            # The API refuses plan requests no live worker can run: let the worker announce itself
            # first, so that a request sent as soon as the server answers is not refused.
            local_worker.wait_until_live(settings.database_url, timeout=_WORKER_START_SECONDS)
        try:
            _run_api(host, port, settings)
        finally:
            if local_worker is not None:
                local_worker.stop()


def _migrate(database_url: str) -> None:
    from storage.db import ensure_schema, make_engine

    engine = make_engine(database_url)
    try:
        ensure_schema(engine)
    finally:
        engine.dispose()


def _run_api(host: str, port: int, settings: Settings) -> None:
    """Run uvicorn until SIGTERM or SIGINT; return normally so that the caller can clean up."""
    import uvicorn

    from api.app import create_app

    def _note(signum: int, _frame: FrameType | None) -> None:
        log.info("Received %s: server stopped.", signal.Signals(signum).name)

    # uvicorn shuts down gracefully on these signals and then re-raises them under the handlers
    # it found at start; with these, the re-raise is noted instead of killing the process.
    signal.signal(signal.SIGTERM, _note)
    signal.signal(signal.SIGINT, _note)
    line = ready_line(host, port)

    class Server(uvicorn.Server):
        """uvicorn's server, saying where the pages and docs are once it listens."""

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # not when the port is taken
                print(line, flush=True)

    Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="info")).run()


def ready_line(host: str, port: int) -> str:
    """The line printed once the server listens: where the pages and the API docs are."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # a wildcard is not a browsable address
    base = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    return f"tuner is serving {base}: web pages {base}/ui, API docs {base}/docs"


class LocalWorker:
    """One `tuner worker --backend auto` child process, kept alive until `stop()`."""

    def __init__(self, *, grace_seconds: float, database_url: str) -> None:
        self._grace_seconds = grace_seconds
        self._database_url = database_url
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._supervise, name="local-worker", daemon=True)

    @property
    def pid(self) -> int | None:
        """Process id of the current worker child (None between restarts)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        self._thread.start()

    def wait_until_live(self, database_url: str, *, timeout: float) -> bool:
        """Wait until the worker child has announced itself in the database (True), or `timeout`
        passed or the server is stopping (False, with a warning: the API starts all the same)."""
        from storage import repository
        from storage.db import make_engine

        engine = make_engine(database_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not self._stopping.is_set():
                pid = self.pid
                if pid is not None and any(
                    f":{pid}:" in worker.worker_id for worker in repository.live_workers(engine)
                ):
                    return True
                time.sleep(0.2)
        finally:
            engine.dispose()
        log.warning("The local worker did not start within %g s; serving without it for now.", timeout)
        return False

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            # The environment carries every other setting to the child; the database is this
            # server's own.
            command = [
                sys.executable,
                "-c",
                "from tuner.cli import main; main()",
                "worker",
                "--backend",
                "auto",
                "--db",
                self._database_url,
            ]
            self._process = subprocess.Popen(command, env=dict(os.environ))
            log.info("Started the local worker (pid %d).", self._process.pid)
            return self._process

    def _supervise(self) -> None:
        delay = 1.0
        while True:
            started = time.monotonic()
            process = self._spawn()
            if process is None:
                return
            code = process.wait()
            if self._stopping.is_set():
                return
            delay = (
                1.0
                if time.monotonic() - started >= _HEALTHY_RUN_SECONDS
                else min(delay * 2, _MAX_RESTART_DELAY_SECONDS)
            )
            log.warning("The local worker exited with code %s; restarting it in %g s.", code, delay)
            if self._stopping.wait(delay):
                return

    def stop(self) -> None:
        """Ask the worker to finish or release its job (SIGTERM), then wait for it to exit."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                # The worker releases an unfinished job after its grace period; allow for that.
                process.wait(self._grace_seconds + 15)
            except subprocess.TimeoutExpired:
                log.warning("The local worker did not stop in time; killing it.")
                process.kill()
                process.wait()
        self._thread.join(5)
