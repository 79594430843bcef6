"""Domain objects to store: real specs, probe results and plans (validated as the API would)."""

from __future__ import annotations

from typing import Any

from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanPolicy, WorkloadSpec, parse_workload

H100 = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
A100 = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=42_505_273_344)


def gpt2_workload(n_layer: int = 2) -> WorkloadSpec:
    return parse_workload(
        {
            "model": {"family": "transformers", "config": {"model_type": "gpt2", "n_layer": n_layer}},
            "inputs": {"kind": "tokens", "seq_len": 256},
        }
    )


def mlp_workload() -> WorkloadSpec:
    return parse_workload(
        {"model": {"family": "builtin", "name": "mlp"}, "inputs": {"kind": "features", "dim": 64}}
    )


def probe_result(
    *,
    workload: WorkloadSpec | None = None,
    device: DeviceSpec = H100,
    torch_version: str = "2.13.0+cu126",
    gradient_checkpointing: bool = False,
    max_batch_size: int = 51,
    alloc_conf: str | None = "expandable_segments:True",
) -> ProbeResult:
    workload = workload or gpt2_workload()
    return ProbeResult(
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=device,
        backend="cuda",
        gradient_checkpointing=gradient_checkpointing,
        max_batch_size=max_batch_size,
        strategy="guided",
        stop_reason="exact",
        trials=[
            Trial(
                batch_size=48,
                ok=True,
                peak_allocated_bytes=70 << 30,
                peak_reserved_bytes=74 << 30,
                seconds=1.5,
                num_alloc_retries=0,
                samples_per_second=310.5,
                step_seconds=0.103,
                peak_phase="backward",
                move="predict",
            ),
            Trial(batch_size=52, ok=False, seconds=0.9, error="out_of_memory"),
            Trial(
                batch_size=max_batch_size,
                ok=True,
                peak_allocated_bytes=74 << 30,
                peak_reserved_bytes=78 << 30,
                seconds=1.6,
                num_alloc_retries=2,
                samples_per_second=315.0,
            ),
        ],
        memory_line=MemoryLine(fixed_bytes=3.5e9, per_sample_bytes=1.45e9),
        capacity_bytes=80 << 30,
        seconds=4.0,
        versions={"torch": torch_version, "transformers": "5.0.0", "tuner": "0.1.0"},
        alloc_conf=alloc_conf,
        facts=WorkloadFacts(parameter_count=124_439_808, has_batchnorm=False),
        verified_steps=5,
        extra={"categories": {"params": 497_759_232}},
    )


def plan(
    *,
    workload: WorkloadSpec | None = None,
    device: DeviceSpec = H100,
    backend: str = "cuda",
    effective_batch_size: int = 512,
    micro_batch_size: int = 32,
    probe_id: int | None = None,
) -> Plan:
    workload = workload or gpt2_workload()
    data: dict[str, Any] = {
        "fingerprint": workload.fingerprint(),
        "workload": workload,
        "device": device,
        "backend": backend,
        "effective_batch_size": effective_batch_size,
        "world_size": 1,
        "micro_batch_size": micro_batch_size,
        "accumulation_steps": effective_batch_size // micro_batch_size,
        "gradient_checkpointing": False,
        "max_micro_batch_size": {"off": 51, "on": 100},
        "memory_budget_bytes": 80 << 30,
        "predicted_peak_bytes": 60 << 30,
        "predicted_samples_per_second": 300.0 if backend == "cuda" else None,
        "probe_id": probe_id,
        "probe_ids": {} if probe_id is None else {"off": probe_id},
        "policy": PlanPolicy(memory_margin=0.1),
        "reason": "the largest micro-batch that divides the effective batch",
        "warnings": ["accumulation of 16 steps"],
        "hints": ["scale the learning rate by sqrt(2)"],
        "accumulation_schedule": [{"until_step": 100, "accumulation_steps": 4}],
        "versions": {"torch": "2.13.0", "tuner": "0.1.0"},
    }
    return Plan(**data)


def plan_request(
    workload: WorkloadSpec, device: DeviceSpec = H100, effective_batch_size: int = 512
) -> dict[str, Any]:
    return {
        "workload": workload.model_dump(mode="json"),
        "effective_batch_size": effective_batch_size,
        "device": device.model_dump(mode="json"),
        "backend": "cuda",
    }
