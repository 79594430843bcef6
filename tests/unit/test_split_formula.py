"""`tuner.results.split_formula`: a plan's effective batch written as the product the pages and the
snippets show (the planner's sentence for a split is `tuner.planner.describe_split`)."""

from __future__ import annotations

from typing import Any

import pytest

from tuner.results import Plan, split_formula
from tuner.spec import DeviceSpec, parse_workload

WORKLOAD = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 8, "num_layers": 1}},
        "inputs": {"kind": "features", "dim": 6, "num_classes": 3},
    }
)


def plan(**fields: Any) -> Plan:
    base: dict[str, Any] = {
        "fingerprint": WORKLOAD.fingerprint(),
        "workload": WORKLOAD,
        "device": DeviceSpec(name="Some GPU", total_memory_bytes=1 << 30),
        "backend": "estimate",
        "gradient_checkpointing": False,
        "max_micro_batch_size": {"off": 64},
        "memory_budget_bytes": 1 << 29,
        "predicted_peak_bytes": 1 << 28,
    }
    return Plan(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "formula"),
    [
        (
            {"effective_batch_size": 512, "world_size": 1, "micro_batch_size": 32, "accumulation_steps": 16},
            "32 × 16 × 1",
        ),
        (
            {"effective_batch_size": 64, "world_size": 8, "micro_batch_size": 8, "accumulation_steps": 1},
            "8 × 1 × 8",
        ),
        (
            {
                "effective_batch_size": 512,
                "world_size": 1,
                "micro_batch_size": 47,
                "accumulation_steps": 11,
                "micro_batch_sizes": [47] * 6 + [46] * 5,
            },
            "(6 × 47 + 5 × 46) × 1",
        ),
        (
            {
                "effective_batch_size": 24,
                "world_size": 2,
                "micro_batch_size": 5,
                "accumulation_steps": 3,
                "micro_batch_sizes": [4, 5, 3],
            },
            "(1 × 5 + 1 × 4 + 1 × 3) × 2",
        ),
    ],
    ids=["even", "world", "uneven", "uneven, largest first"],
)
def test_the_split_is_written_as_its_product(fields: dict[str, Any], formula: str) -> None:
    assert split_formula(plan(**fields)) == formula
