"""`tuner worker` (docs/contract.md): one worker that claims probe jobs from the shared database."""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from tuner.cli._common import clear_errors, fail, size_option

if TYPE_CHECKING:
    from tuner.spec import Backend, DeviceSpec


class WorkerBackend(StrEnum):
    auto = "auto"
    cuda = "cuda"
    estimate = "estimate"


def worker(
    backend: WorkerBackend | None = typer.Option(
        None,
        "--backend",
        help="cuda: real trials on this machine's GPU; estimate: GPU-free traces for any device; "
        "auto: cuda when a GPU is present, else estimate. Default: TUNER_WORKER_BACKEND (auto).",
        show_default=False,
    ),
    db: str | None = typer.Option(
        None, "--db", help="Database URL (default: TUNER_DATABASE_URL, sqlite:///./tuner.db)."
    ),
    device_name: str | None = typer.Option(
        None, "--device-name", help="estimate only, informational: the device named in the worker id."
    ),
    device_memory: str | None = typer.Option(
        None, "--device-memory", help="estimate only, informational: e.g. 80GiB."
    ),
    once: bool = typer.Option(False, "--once", help="Process at most one job, then exit."),
) -> None:
    """Claim probe jobs this worker's backend and device can serve, probe, store, derive plans."""
    _configure_logging()
    with clear_errors():
        from tuner.settings import get_settings

        settings = get_settings()
        if db is not None:  # passed on, not written into the environment
            settings = settings.model_copy(update={"database_url": db})
        chosen = backend.value if backend is not None else settings.worker_backend
        resolved, device = _resolve_backend(chosen, device_name, size_option(device_memory))

        from probes.worker import Worker, new_worker_id
        from storage.db import make_engine

        engine = make_engine(settings.database_url)
        job_worker = Worker(
            engine,
            backend=resolved,
            device=device,
            worker_id=new_worker_id(resolved, device_name),
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=min(settings.heartbeat_seconds, settings.lease_seconds / 3),
            poll_seconds=settings.worker_poll_seconds,
            retry_backoff_seconds=settings.retry_backoff_seconds,
            grace_seconds=settings.shutdown_grace_seconds,
            probe_timeout_seconds=settings.probe_timeout_seconds,
            estimate_timeout_seconds=settings.estimate_timeout_seconds,
        )
        try:
            if once:
                job_worker.run_once()
            else:
                job_worker.run_forever()
        finally:
            engine.dispose()


def _resolve_backend(
    chosen: str, device_name: str | None, device_memory: int | None
) -> tuple[Backend, DeviceSpec | None]:
    """The backend to run and the device it serves (the local GPU for cuda)."""
    from probes.local_gpu import detect_local_gpu
    from tuner.spec import DeviceSpec

    if chosen in ("auto", "cuda"):
        gpu = detect_local_gpu()
        if gpu is not None:
            if device_name or device_memory:
                fail(
                    "--device-name and --device-memory are for estimate workers; a cuda worker "
                    "serves its own GPU."
                )
            return "cuda", gpu
        if chosen == "cuda":
            fail(
                "No CUDA GPU is visible to this process; check CUDA_VISIBLE_DEVICES and the "
                "driver, or run 'tuner worker --backend estimate'."
            )
        logging.getLogger("tuner.worker").info("No CUDA GPU found: serving estimate jobs.")
    if (device_name is None) != (device_memory is None):
        fail("Give --device-name and --device-memory together, or neither.")
    if device_name is not None and device_memory is not None:
        return "estimate", DeviceSpec(name=device_name, total_memory_bytes=device_memory)
    return "estimate", None


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("TUNER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
