"""Against a real `tuner serve` (API + worker, SQLite): the client, plan_for, autotune and the
example training script. Skipped where the service is not part of this installation."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import TUNER, clean_env, free_port, start_server
from tuner import autotune, plan_for
from tuner.client import Job, TunerClient
from tuner.errors import ServiceError, SpecError
from tuner.results import Plan, ProbeResult
from tuner.spec import DeviceSpec, PlanRequest

# The server runs in its own process; here it only has to be part of the installation.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("api.app") is None, reason="the tuner service is not installed"
    ),
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_decoder.py"
TOKEN = "e2e-token"
DEVICE = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=40 << 30)
sys.path.insert(0, str(EXAMPLE.parent))
from train_decoder import workload  # noqa: E402

SPEC = workload(64)  # the example's workload: the server probes it once for every test here


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tuner serve`: the API with its own local worker, on an SQLite file."""
    directory = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = clean_env({"TUNER_LOG_LEVEL": "WARNING"}, token=TOKEN)
    env.pop("TUNER_SERVER", None)
    running = start_server(
        [*TUNER, "serve", "--port", str(port), "--db", f"sqlite:///{directory / 'tuner.db'}"],
        port=port,
        env=env,
        log_path=directory / "serve.log",
    )
    try:
        yield running.base_url
    finally:
        running.stop(timeout=30)


def request() -> PlanRequest:
    return PlanRequest(
        workload=SPEC,
        effective_batch_size=24,
        device=DEVICE,
        backend="estimate",
        policy={"gradient_checkpointing": "off", "max_micro_batch_size": 8},  # type: ignore[arg-type]
    )


def test_client_against_the_service(server: str) -> None:
    with TunerClient(server, token=TOKEN, poll_interval=0.3) as client:
        submitted = client.submit_plan(request())
        if isinstance(submitted, Job):
            job = client.wait_for_job(submitted)
            assert job.status == "succeeded" and job.plan_id is not None
            assert client.get_job(job.id).status == "succeeded"
        plan = client.create_plan(request(), progress=False)
        assert plan.cache_hit and plan.id is not None
        assert (plan.micro_batch_size, plan.accumulation_steps) == (8, 3)
        assert client.get_plan(plan.id).fingerprint == SPEC.fingerprint()
        page = client.list_plans(fingerprint=SPEC.fingerprint(), model="decoder")
        assert page.total >= 1 and all(p.fingerprint == SPEC.fingerprint() for p in page.items)
        assert plan.probe_id is not None
        probe = client.get_probe(plan.probe_id)
        assert probe.trials and probe.max_batch_size >= 8
        with pytest.raises(ServiceError) as caught:
            client.get_plan(10**9)
        assert (caught.value.status_code, caught.value.code) == (404, "not_found")
        assert client.health()["status"] == "ok"
    with TunerClient(server) as anonymous, pytest.raises(ServiceError) as caught:
        anonymous.submit_plan(request())
    assert caught.value.status_code == 401


def test_plan_for_and_autotune_against_the_service(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_API_TOKEN", TOKEN)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = plan_for(
        SPEC,
        effective_batch_size=24,
        server=server,
        device=DEVICE,
        policy={"gradient_checkpointing": "off", "max_micro_batch_size": 8},
    )
    assert isinstance(plan, Plan) and plan.id is not None and plan.world_size == 1

    import torch

    ran: list[int] = []

    def step(batch_size: int) -> None:
        ran.append(batch_size)
        if batch_size > 11:
            raise torch.OutOfMemoryError("out of memory")

    def tune() -> ProbeResult:
        # The workload is found on the server by fingerprint.
        return autotune(
            step, fingerprint=SPEC.fingerprint(), device=DEVICE, server=server, strategy="doubling"
        )

    if not torch.cuda.is_available():
        # A run here would measure the CPU, not the named GPU: refused before the step runs, and
        # nothing is uploaded as that GPU's.
        with pytest.raises(SpecError, match="never uploaded"):
            tune()
        assert ran == []
        return
    uploaded = tune()
    assert uploaded.id is not None and uploaded.max_batch_size == 11 and uploaded.workload == SPEC
    with TunerClient(server) as client:
        assert client.get_probe(uploaded.id).max_batch_size == 11


def test_the_example_trains_with_the_services_plan(server: str) -> None:
    env = {**os.environ, "TUNER_API_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--server",
                server,
                "--effective-batch-size",
                "24",
                "--steps",
                "4",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "micro-batch 8 × 3 accumulation steps" in run.stdout
    assert "cache hit True" in runs[1].stdout
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+)", runs[0].stdout, flags=re.M)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_the_plan_command_draws_the_servers_probe(server: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "decoder.json"
    spec_file.write_text(SPEC.model_dump_json())
    command = [
        *TUNER,
        "plan",
        str(spec_file),
        "--effective-batch-size",
        "24",
        "--server",
        server,
        "--device-memory",
        str(DEVICE.total_memory_bytes),
        "--device-name",
        DEVICE.name,
        "--checkpointing",
        "off",
        "--max-micro-batch-size",
        "8",
    ]
    env = {**os.environ, "TUNER_API_TOKEN": TOKEN, "COLUMNS": "200"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("Peak reserved memory by micro-batch"))
    assert "40.00 GiB" in lines[title]
    rows = [line for line in lines[title + 1 :] if line.lstrip().startswith("b=")]
    assert len(rows) >= 2 and sum("planned micro-batch" in row for row in rows) == 1
