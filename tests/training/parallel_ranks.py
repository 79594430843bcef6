"""Ranks of a real gloo group for tests/training/test_plan_for_parallel.py (top-level functions,
so that `torch.multiprocessing.spawn` can start them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

TINY_GPT2 = GPT2Config(
    n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=1
)


def wrapped_model(kind: str) -> Any:
    """A tiny GPT-2 as a training script would have it: wrapped in DDP or sharded by FSDP2."""
    model = GPT2LMHeadModel(TINY_GPT2)
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, bucket_cap_mb=10, gradient_as_bucket_view=True
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=False, mp_policy=policy)
    fully_shard(model, reshard_after_forward=False, mp_policy=policy)
    return model


def detect_main(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """What `plan_for` would read in this rank: the world size and each wrapper's parallelism."""
    from tuner.integration import detect_parallelism, detect_world_size, unwrapped, workload_for

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        found: dict[str, Any] = {"world_size": detect_world_size()}
        for kind in ("ddp", "fsdp"):
            model = wrapped_model(kind)
            spec = detect_parallelism(model)
            found[kind] = None if spec is None else spec.model_dump(mode="json")
            found[f"{kind}_model_type"] = workload_for(unwrapped(model), inputs=32).describe()
        found["bare"] = detect_parallelism(GPT2LMHeadModel(TINY_GPT2))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


def plan_main(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """A whole `plan_for` of a DDP-wrapped model in a one-rank gloo group, by estimate."""
    from tuner import plan_for
    from tuner.spec import DeviceSpec

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        plan = plan_for(
            wrapped_model("ddp"),
            effective_batch_size=8,
            inputs=32,
            precision="fp32",
            device=DeviceSpec(name="small card", total_memory_bytes=4 << 30),
            backend="estimate",
            local=True,
            policy={"gradient_checkpointing": "off"},
        )
        Path(out_dir, f"plan{rank}.json").write_text(plan.model_dump_json())
    finally:
        dist.destroy_process_group()
