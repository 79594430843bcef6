"""Probe results written straight into the database, so that plans are cached without a worker.

The numbers follow the shape real probes have (docs/gpu_memory.md): peak reserved bytes grow linearly
in the micro-batch, and the largest batch sits just under the device's memory.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from storage import repository
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, WorkloadSpec, parse_workload

TORCH_VERSION = "2.13.0"
TORCH_MINOR = "2.13"
DEVICE = DeviceSpec(name="Test GPU 1GiB", total_memory_bytes=1 << 30)
OTHER_DEVICE = DeviceSpec(name="Unprobed GPU 2GiB", total_memory_bytes=2 << 30)


def mlp_workload(hidden_dim: int = 64) -> WorkloadSpec:
    return parse_workload(
        {
            "model": {
                "family": "builtin",
                "name": "mlp",
                "kwargs": {"hidden_dim": hidden_dim, "num_layers": 2},
            },
            "inputs": {"kind": "features", "dim": 32, "num_classes": 10},
            "precision": "fp32",
        }
    )


def plan_request(
    workload: WorkloadSpec | None = None,
    *,
    effective_batch_size: int = 64,
    device: DeviceSpec | None = DEVICE,
    backend: str = "estimate",
    checkpointing: str = "auto",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "workload": (workload or mlp_workload()).model_dump(mode="json"),
        "effective_batch_size": effective_batch_size,
        "backend": backend,
        "policy": {"gradient_checkpointing": checkpointing},
    }
    if device is not None:
        body["device"] = device.model_dump(mode="json")
    return body


def probe_result(
    workload: WorkloadSpec,
    *,
    device: DeviceSpec = DEVICE,
    checkpointing: bool,
    backend: str = "estimate",
) -> ProbeResult:
    """A probe with a linear memory line: 100 MB fixed, 20 MB per sample (8 MB with checkpointing)."""
    line = MemoryLine(fixed_bytes=100e6, per_sample_bytes=8e6 if checkpointing else 20e6)
    largest = line.largest_batch_under(device.total_memory_bytes * 0.95)
    sizes = [8, largest // 2, largest, largest + 1]
    trials = [
        Trial(
            batch_size=b,
            ok=b <= largest,
            peak_allocated_bytes=int(line.at(b) * 0.9) if b <= largest else None,
            peak_reserved_bytes=int(line.at(b)) if b <= largest else None,
            seconds=0.01,
            error=None if b <= largest else "out_of_memory",
        )
        for b in sizes
    ]
    return ProbeResult(
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=device,
        backend=backend,  # type: ignore[arg-type]
        gradient_checkpointing=checkpointing,
        max_batch_size=largest,
        trials=trials,
        memory_line=line,
        capacity_bytes=int(device.total_memory_bytes * 0.95),
        seconds=1.5,
        versions={"torch": TORCH_VERSION, "tuner": "0.1.0"},
    )


def seed_probes(
    engine: Engine, workload: WorkloadSpec, *, device: DeviceSpec = DEVICE, backend: str = "estimate"
) -> dict[bool, int]:
    """Both checkpointing choices stored; their ids by choice."""
    return {
        checkpointing: repository.save_probe(
            engine, result=probe_result(workload, device=device, checkpointing=checkpointing, backend=backend)
        )
        for checkpointing in (False, True)
    }
