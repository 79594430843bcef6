"""The estimator's data-parallel ranks against the real thing (issue 15's "Show").

FSDP2 traced at world size 2 on a fake process group with fake tensors, against real FSDP2 on two
gloo processes with real CPU tensors; the modelled DDP buckets against real DDP (its C++
reducer) on two gloo processes. Both sides count the bytes of every storage with the same
tracker; the peaks per rank must agree within 5 %."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

from probes.child import run_in_child
from tests.probes import parallel_ranks
from tuner.parallelism import ParallelismSpec, ParallelSetup

WORLD_SIZE = 2
BATCH = 4
# A small decoder whose gradients (1.3 MB) are large beside its activations, so that DDP's
# buckets and FSDP's sharding both move the peak, and big enough for several 1 MiB buckets.
DECODER = {
    "model": {
        "family": "builtin",
        "name": "decoder",
        "kwargs": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 2000, "max_seq_len": 32},
    },
    "inputs": {"kind": "tokens", "seq_len": 32},
    "precision": "fp32",
}


def _setup(strategy: str, **options: Any) -> dict[str, Any]:
    spec = ParallelismSpec.model_validate({"strategy": strategy, **options})
    return ParallelSetup(parallelism=spec, world_size=WORLD_SIZE).model_dump(mode="json")


def _real_peaks(tmp_path: Path, setup: dict[str, Any]) -> list[int]:
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(
        parallel_ranks.rank_main,
        args=(WORLD_SIZE, rendezvous, DECODER, setup, BATCH, str(tmp_path)),
        nprocs=WORLD_SIZE,
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text())["peak_bytes"] for r in range(WORLD_SIZE)]


def _fake(setup: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = run_in_child(parallel_ranks.fake_trace, DECODER, setup, BATCH, timeout=300)
    return result


@pytest.mark.parametrize(
    "strategy, options",
    [
        ("fsdp", {}),
        ("fsdp", {"reshard_after_forward": False}),
        ("ddp", {}),
        ("ddp", {"gradient_as_bucket_view": True, "bucket_cap_mb": 1}),
    ],
)
def test_one_traced_rank_holds_what_a_real_rank_holds(
    tmp_path: Path, strategy: str, options: dict[str, Any]
) -> None:
    setup = _setup(strategy, **options)
    fake = _fake(setup)
    for rank, real in enumerate(_real_peaks(tmp_path, setup)):
        assert abs(fake["peak_bytes"] - real) <= 0.05 * real, (rank, fake, real)


def test_the_strategies_move_the_peak_as_they_should() -> None:
    """Not a tautology of the comparison above: DDP's buckets add a copy of the gradients, FSDP
    at two ranks halves parameters and optimizer state."""
    single = _fake(ParallelSetup().model_dump(mode="json"))
    ddp = _fake(_setup("ddp"))
    fsdp = _fake(_setup("fsdp"))
    parameter_bytes = single["categories"]["parameters"]  # fp32: a gradient per parameter (and buffers)
    assert abs(ddp["categories"]["buckets"] - parameter_bytes) <= 0.02 * parameter_bytes
    assert ddp["peak_bytes"] > single["peak_bytes"]
    assert fsdp["categories"]["parameters"] <= 0.55 * single["categories"]["parameters"]


@pytest.mark.parametrize(
    "strategy, options",
    [("ddp", {}), ("ddp", {"gradient_as_bucket_view": True}), ("fsdp", {})],
)
def test_the_cuda_backends_wrapper_holds_what_the_trace_holds(strategy: str, options: dict[str, Any]) -> None:
    """The cuda backend's one rank (real DDP or FSDP2 over a fake group, collectives free) on
    real CPU tensors, against the estimate's trace of the same rank."""
    setup = _setup(strategy, **options)
    real: int = run_in_child(parallel_ranks.real_tensors_on_a_fake_group, DECODER, setup, BATCH, timeout=300)
    fake = _fake(setup)["peak_bytes"]
    assert abs(fake - real) <= 0.05 * real, (fake, real)
