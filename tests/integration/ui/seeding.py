"""A database of past plans for the pages: probe results stored through the repository, plans
derived from them by the real planner and stored with their requests, and probe jobs queued and
running. Several models (one whose name is `<script>alert(1)</script>`), devices and backends.

Probe numbers have the shape real ones have (docs/gpu_memory.md): reserved bytes grow linearly in the
micro-batch, allocated sits below reserved, checkpointing cuts the per-sample bytes and costs
throughput, and only the cuda backend measures samples/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from storage import repository
from storage.records import Accepts
from tuner.planner import make_plan
from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanRequest, WorkloadSpec, parse_workload

SCRIPT_NAME = "<script>alert(1)</script>"
"""A transformers `model_type` that validates (any string does) and must render as text."""
SCRIPT_CONFIG_KEY = "<script>alert(2)</script>"

H100 = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
A100 = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=42_505_273_344)
L4 = DeviceSpec(name="NVIDIA L4", total_memory_bytes=23_580_639_232)
ODD_DEVICE = DeviceSpec(name='Lab card "<b>7</b>" & co', total_memory_bytes=17_179_869_184)
"""A device name with quotes, tags and an ampersand: attribute and text escaping."""

GIB = 1 << 30


@dataclass(frozen=True)
class Model:
    workload: WorkloadSpec
    parameter_count: int
    fixed_bytes: float
    """Weights, gradients and optimizer state on `H100`-class memory."""
    per_sample_bytes: float
    samples_per_second: float
    """Throughput the model approaches at large micro-batches on an H100."""
    has_batchnorm: bool = False


def _transformers(config: dict[str, Any], seq_len: int, precision: str = "bf16-mixed") -> WorkloadSpec:
    # As rows read back from storage are validated: without the intake checks, which would refuse
    # the hostile model type (the pages must still escape whatever a database holds).
    return WorkloadSpec.model_validate(
        {
            "model": {"family": "transformers", "config": config},
            "inputs": {"kind": "tokens", "seq_len": seq_len},
            "precision": precision,
        }
    )


MODELS: dict[str, Model] = {
    "gpt2": Model(
        _transformers({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12}, 1024),
        124_439_808, 2.4 * GIB, 1.45 * GIB, 180.0,
    ),
    "llama": Model(
        _transformers(
            {"model_type": "llama", "num_hidden_layers": 22, "hidden_size": 2048, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
            2048,
        ),
        1_100_048_384, 17.8 * GIB, 2.9 * GIB, 21.0,
    ),
    "decoder": Model(
        parse_workload(
            {"model": {"family": "builtin", "name": "decoder"}, "inputs": {"kind": "tokens", "seq_len": 128},
             "precision": "fp32"}
        ),
        3_293_184, 0.06 * GIB, 0.021 * GIB, 5200.0,
    ),
    "cnn": Model(
        parse_workload(
            {"model": {"family": "builtin", "name": "cnn"},
             "inputs": {"kind": "image", "channels": 3, "height": 32, "width": 32, "num_classes": 10},
             "precision": "fp16-mixed"}
        ),
        1_204_042, 0.05 * GIB, 0.004 * GIB, 21000.0, has_batchnorm=True,
    ),
    "script": Model(
        _transformers({"model_type": SCRIPT_NAME, SCRIPT_CONFIG_KEY: 1, "n_layer": 2}, 512),
        7_340_032, 0.4 * GIB, 0.09 * GIB, 900.0,
    ),
}  # fmt: skip


def probe(
    model: Model, device: DeviceSpec, *, backend: str, checkpointing: bool, created_at: datetime
) -> ProbeResult:
    """A guided search's trials: a predicted size, its confirmation, one above that fails."""
    scale = device.total_memory_bytes / H100.total_memory_bytes
    per_sample = model.per_sample_bytes * (0.42 if checkpointing else 1.0)
    line = MemoryLine(fixed_bytes=model.fixed_bytes, per_sample_bytes=per_sample)
    capacity = int(device.total_memory_bytes * 0.97)
    largest = line.largest_batch_under(capacity)
    speed = model.samples_per_second * (0.8 if checkpointing else 1.0) * min(1.0, 0.35 + scale)

    def trial(batch_size: int) -> Trial:
        fits = batch_size <= largest
        reserved = int(line.at(batch_size))
        # A real OOM stops the step before its peak is known; an estimate traces the whole step.
        measured = fits or backend == "estimate"
        return Trial(
            batch_size=batch_size,
            ok=fits,
            peak_allocated_bytes=int(reserved * 0.88) if measured else None,
            peak_reserved_bytes=reserved if measured else None,
            seconds=1.2 + batch_size / 50,
            num_alloc_retries=0 if fits else None,
            samples_per_second=speed * batch_size / (batch_size + 6) if fits and backend == "cuda" else None,
            peak_phase="backward" if fits else None,
            error=None if fits else "out_of_memory",
        )

    sizes = sorted({max(1, largest // 4), max(1, largest // 2), largest, largest + 1}) if largest else [1]
    return ProbeResult(
        created_at=created_at,
        fingerprint=model.workload.fingerprint(),
        workload=model.workload,
        device=device,
        backend=backend,  # type: ignore[arg-type]
        gradient_checkpointing=checkpointing,
        max_batch_size=largest,
        strategy="guided",
        stop_reason="exact",
        trials=[trial(b) for b in sizes],
        memory_line=line,
        capacity_bytes=capacity,
        seconds=sum(trial(b).seconds for b in sizes),
        versions={"torch": "2.13.0+cu126" if backend == "cuda" else "2.13.0+cpu", "tuner": "0.1.0"},
        facts=WorkloadFacts(parameter_count=model.parameter_count, has_batchnorm=model.has_batchnorm),
    )


@dataclass(frozen=True)
class SeededPlan:
    id: int
    model: str
    """`WorkloadSpec.describe()` of the plan's workload."""
    device: DeviceSpec
    backend: str
    plan: Plan


# (model, device, backend, effective batch, world size, uneven micro-batches allowed)
PLAN_SETUPS: list[tuple[str, DeviceSpec, str, int, int, bool]] = [
    ("gpt2", H100, "cuda", 512, 1, False),
    ("gpt2", A100, "estimate", 512, 1, False),
    ("gpt2", L4, "estimate", 256, 1, True),
    ("gpt2", H100, "cuda", 1024, 8, False),
    ("llama", H100, "cuda", 256, 1, False),
    ("llama", A100, "estimate", 1024, 4, False),
    ("decoder", L4, "cuda", 4096, 1, False),
    ("decoder", ODD_DEVICE, "estimate", 2048, 1, False),
    ("cnn", L4, "cuda", 16384, 1, False),
    ("cnn", A100, "estimate", 8192, 2, False),
    ("gpt2", L4, "cuda", 96, 1, True),
    ("llama", L4, "estimate", 64, 1, False),
    ("script", H100, "cuda", 64, 1, False),
]


def seed_plans(engine: Engine, *, start: datetime) -> list[SeededPlan]:
    """Every setup of `PLAN_SETUPS` probed (both checkpointing choices) and planned, one minute
    apart from `start` on, in that order (so the list shows the last one first)."""
    seeded = []
    for index, (name, device, backend, effective, world, uneven) in enumerate(PLAN_SETUPS):
        model = MODELS[name]
        when = start + timedelta(minutes=index)
        probes = {}
        for checkpointing in (False, True):
            result = probe(model, device, backend=backend, checkpointing=checkpointing, created_at=when)
            probe_id = repository.save_probe(engine, result=result)
            probes[checkpointing] = repository.get_probe(engine, probe_id=probe_id)
        request = plan_request(model.workload, device, backend, effective, world, uneven)
        plan = make_plan(request, probes).model_copy(update={"created_at": when})
        plan_id = repository.save_plan(engine, plan=plan, request=request)
        stored = repository.get_plan(engine, plan_id=plan_id)
        seeded.append(SeededPlan(plan_id, model.workload.describe(), device, backend, stored))
    return seeded


def plan_request(
    workload: WorkloadSpec, device: DeviceSpec, backend: str, effective: int, world: int, uneven: bool
) -> PlanRequest:
    return PlanRequest.model_validate(  # as stored: without the intake checks (see `_transformers`)
        {
            "workload": workload.model_dump(mode="json"),
            "effective_batch_size": effective,
            "world_size": world,
            "device": device.model_dump(mode="json"),
            "backend": backend,
            "policy": {"gradient_checkpointing": "auto", "allow_uneven_micro_batches": uneven},
        }
    )


@dataclass(frozen=True)
class SeededJobs:
    queued_id: int
    running_id: int


def seed_jobs(engine: Engine) -> SeededJobs:
    """One probe job running with a reported trial, and one queued behind it."""
    running_workload = MODELS["llama"].workload
    queued_workload = MODELS["gpt2"].workload
    running, _ = repository.enqueue_or_join(
        engine,
        key=f"ui-test-running-{running_workload.fingerprint()}",
        payload=_job_payload(running_workload, H100, "cuda"),
        max_attempts=3,
    )
    claimed = repository.claim_job(
        engine, worker_id="ui-test-worker", lease_seconds=3600, accepts=Accepts(backend="cuda")
    )
    assert claimed is not None and claimed.id == running.id
    repository.heartbeat(
        engine,
        job_id=running.id,
        worker_id="ui-test-worker",
        lease_seconds=3600,
        progress={"gradient_checkpointing": False, "trials": 2, "last_batch_size": 48, "ok": True},
    )
    queued, _ = repository.enqueue_or_join(
        engine,
        key=f"ui-test-queued-{queued_workload.fingerprint()}",
        payload=_job_payload(queued_workload, A100, "estimate"),
        max_attempts=3,
    )
    return SeededJobs(queued_id=queued.id, running_id=running.id)


def _job_payload(workload: WorkloadSpec, device: DeviceSpec, backend: str) -> dict[str, Any]:
    return {
        "workload": workload.model_dump(mode="json"),
        "device": device.model_dump(mode="json"),
        "backend": backend,
        "gradient_checkpointing": [False, True],
        "torch_minor": "2.13",
    }
