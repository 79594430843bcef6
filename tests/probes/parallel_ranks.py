"""The other side of tests/probes/test_parallel_real.py: the canonical step on real CPU tensors
in every rank of a real gloo process group, wrapped in real FSDP2 or real DDP, with the
estimator's storage tracker counting the bytes of every real storage. Top-level functions, so
that `torch.multiprocessing.spawn` can start them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tuner.parallelism import ParallelSetup
from tuner.spec import parse_workload


def rank_main(
    rank: int,
    world_size: int,
    rendezvous: str,
    workload: dict[str, Any],
    setup: dict[str, Any],
    batch_size: int,
    out_dir: str,
) -> None:
    """One rank: join the gloo group, run two canonical steps, write its peak to `out_dir`."""
    from probes.estimate import emulation
    from probes.estimate.trace import _run_steps
    from probes.estimate.tracker import MemoryTracker
    from probes.parallel import one_rank
    from probes.step import run_train_steps
    from probes.workloads import build_workload

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        # The same CUDA emulation as the fake trace, so that only the parallel wrapping differs.
        emulation.install_cuda_emulation()
        spec = parse_workload(workload)
        parallel = ParallelSetup.model_validate(setup)
        built = build_workload(spec, device="cpu", seed=0)
        tracker = MemoryTracker()
        strategy = parallel.parallelism.strategy
        if strategy == "fsdp":
            # Real FSDP2 over this real group (`one_rank` shards over the group it finds).
            with tracker, one_rank(built, parallel, "cpu") as wrapped:
                _run_steps(built, batch_size, 2, tracker, rank=wrapped)
        else:
            # Real DDP: its C++ reducer allocates the buckets and copies the gradients.
            with tracker:
                tracker.classify(built.model.parameters(), "parameters")
                built.model = torch.nn.parallel.DistributedDataParallel(
                    built.model,
                    bucket_cap_mb=parallel.parallelism.bucket_cap_mb,
                    gradient_as_bucket_view=parallel.parallelism.gradient_as_bucket_view,
                )
                optimizer = built.make_optimizer()
                run_train_steps(
                    built,
                    batch_size,
                    iterations=2,
                    optimizer=optimizer,
                    on_phase=tracker.set_phase,
                    data_dependent=False,
                )
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"peak_bytes": tracker.peak_bytes, "peak_phase": tracker.peak_phase})
        )
    finally:
        dist.destroy_process_group()


def fake_trace(workload: dict[str, Any], setup: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The estimator's side, in a child process: the fake-tensor trace as one rank of `setup`."""
    from probes.estimate import emulation
    from probes.estimate.trace import trace_step

    emulation.install_cuda_emulation()
    step = trace_step(parse_workload(workload), batch_size, parallel=ParallelSetup.model_validate(setup))
    return {"peak_bytes": step.peak_bytes, "peak_phase": step.peak_phase, "categories": step.peak_categories}


def real_tensors_on_a_fake_group(workload: dict[str, Any], setup: dict[str, Any], batch_size: int) -> int:
    """What the cuda backend runs, on the CPU: the real wrapper (`wrap_one_rank`) over a fake
    process group, real tensors, the tracker counting every storage. In a child process (the
    fake group lives as long as the process)."""
    from probes.estimate import emulation
    from probes.estimate.trace import _attribute_gradients_and_state
    from probes.estimate.tracker import MemoryTracker
    from probes.parallel import wrap_one_rank
    from probes.step import run_train_steps
    from probes.workloads import build_workload

    emulation.install_cuda_emulation()
    built = build_workload(parse_workload(workload), device="cpu", seed=0)
    tracker = MemoryTracker()
    with tracker:
        tracker.classify(built.model.parameters(), "parameters")
        rank = wrap_one_rank(built, ParallelSetup.model_validate(setup), "cpu")
        optimizer = rank.make_optimizer()
        # The trace's own hooks, which also count the sharded gradients FSDP2 assigns past the
        # dispatcher (views of its reduce-scatter output), so that both sides see the same.
        _attribute_gradients_and_state(rank.model, optimizer, tracker)
        run_train_steps(rank, batch_size, iterations=2, optimizer=optimizer, data_dependent=False)
    return tracker.peak_bytes
