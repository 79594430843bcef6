"""`plan_for` in a real process group (gloo): the world size from the live group, and the
parallelism from how the model is already wrapped (DDP's options, FSDP2's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.training import parallel_ranks
from tuner.errors import SpecError
from tuner.integration import detect_parallelism, plan_for
from tuner.results import Plan
from tuner.spec import DeviceSpec


def test_each_rank_reads_the_group_and_the_wrapper(tmp_path: Path) -> None:
    mp.spawn(parallel_ranks.detect_main, args=(2, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=2)
    for rank in range(2):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["world_size"] == 2
        assert found["ddp"] == {"strategy": "ddp", "gradient_as_bucket_view": True, "bucket_cap_mb": 10.0}
        assert found["fsdp"] == {"strategy": "fsdp", "reshard_after_forward": False, "param_dtype": "bf16"}
        assert found["ddp_model_type"] == found["fsdp_model_type"] == "gpt2"  # the spec of the model inside
        assert found["bare"] is None  # the request's default decides


def test_a_ddp_wrapped_model_is_planned_with_its_buckets(tmp_path: Path) -> None:
    mp.spawn(parallel_ranks.plan_main, args=(1, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=1)
    plan = Plan.model_validate_json((tmp_path / "plan0.json").read_text())
    assert plan.world_size == 1
    assert plan.parallelism.strategy == "ddp" and plan.parallelism.gradient_as_bucket_view
    assert plan.parallelism.bucket_cap_mb == 10
    assert plan.memory_per_rank is not None and plan.memory_per_rank["buckets"] > 0
    assert plan.micro_batch_size * plan.accumulation_steps * plan.world_size == 8


def test_without_a_group_or_a_wrapper_nothing_is_detected() -> None:
    assert detect_parallelism(parallel_ranks.GPT2LMHeadModel(parallel_ranks.TINY_GPT2)) is None


def test_a_bad_parallelism_argument_names_the_field() -> None:
    with pytest.raises(SpecError, match=r"parallelism\.strategy: Input should be"):
        plan_for(
            parallel_ranks.GPT2LMHeadModel(parallel_ranks.TINY_GPT2),
            effective_batch_size=8,
            device=DeviceSpec(name="card", total_memory_bytes=1 << 30),
            parallelism={"strategy": "zero3"},
            local=True,
        )
