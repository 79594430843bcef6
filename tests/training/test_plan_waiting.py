"""plan_for waiting on a server's job that no worker claims (its worker died without retiring):
a limit that ends the wait with the job named, and log lines of the job's state off a terminal."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from storage import repository
from storage.db import make_engine
from storage.records import Accepts
from tests.servers import start_api_server
from tuner import plan_for
from tuner.errors import ServiceError
from tuner.spec import DeviceSpec, parse_workload

TOKEN = "waiting-token"
GONE = DeviceSpec(name="Test GPU 2GiB (its worker is gone)", total_memory_bytes=2 << 30)
MLP = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 48, "num_layers": 1}},
        "inputs": {"kind": "features", "dim": 16},
        "precision": "fp32",
    }
)


def test_a_job_no_worker_claims_ends_at_max_wait_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tuner.job_log

    monkeypatch.setattr(tuner.job_log, "QUEUED_WARNING_SECONDS", 0.5)
    database_url = f"sqlite:///{tmp_path / 'tuner.db'}"
    server = start_api_server(database_url, tmp_path, token=TOKEN)
    engine = make_engine(database_url)
    try:
        # A cuda worker that announced itself and died: the API still counts it as live.
        gpu = Accepts(backend="cuda", device_name=GONE.name, device_memory_bytes=GONE.total_memory_bytes)
        repository.announce_worker(engine, worker_id="gone-node:1:x", accepts=gpu, ttl_seconds=300)
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="tuner"), pytest.raises(ServiceError) as caught:
            plan_for(
                MLP,
                effective_batch_size=32,
                device=GONE,
                backend="cuda",
                server=server.base_url,
                token=TOKEN,
                wait=0,
                max_wait=2.0,
            )
        waited = time.monotonic() - started
    finally:
        server.stop()
        engine.dispose()
    assert caught.value.code == "job_timeout" and "still queued after 2 s" in caught.value.message
    assert waited < 30
    lines = [r.getMessage() for r in caplog.records if r.name == "tuner"]
    assert any(line.startswith("planning mlp: job") and line.endswith("queued") for line in lines)
    warnings = [r.getMessage() for r in caplog.records if r.name == "tuner" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no worker of" in warnings[0] and "/v1/jobs/" in warnings[0]
