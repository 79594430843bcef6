"""Estimate accuracy and speed on the shared benchmark workloads.

For every workload in ../shared/bench/workloads, both loop shapes (`loop.keeps_outputs` true and
false), micro-batch 1, 2, 4, 8, gradient checkpointing off and on: the estimate's traced,
allocated and reserved bytes and its seconds (wall and CPU), one child process per workload (a
warm-up trace first, so the seconds exclude imports). Where CUDA is available, each point also
runs for real in a fresh child process: real max allocated and reserved bytes and their ratios to
the estimate (the device model's fit on such runs: bench/estimate_calibration.py).

    .venv/bin/python bench/estimate_accuracy.py [--workloads DIR] [--batch-sizes 1,2,4,8]
        [--loops keeps,releases]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from probes.child import run_in_child  # noqa: E402
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL  # noqa: E402
from tuner.spec import LoopSpec, WorkloadSpec, load_workload_file  # noqa: E402

WORKLOADS = REPO.parent / "shared" / "bench" / "workloads"
MIB = 1 << 20


@dataclass(frozen=True)
class Point:
    workload: str
    loop: str
    batch_size: int
    checkpointing: bool
    traced: int
    allocated: int
    reserved: int
    phase: str
    seconds: float
    cpu_seconds: float


def _estimate_all(spec: WorkloadSpec, name: str, loop: str, batch_sizes: list[int]) -> list[Point]:
    from probes.estimate.session import EstimateSession

    EstimateSession().trace(spec, 1)  # warm-up: lazy imports of the model's modules
    session = EstimateSession()  # every point below traced afresh (its own warm-up step included)
    points = []
    for checkpointing in (False, True):
        for b in batch_sizes:
            cpu = time.process_time()
            started = time.perf_counter()
            report = session.trace(spec, b, gradient_checkpointing=checkpointing)
            points.append(
                Point(
                    name,
                    loop,
                    b,
                    checkpointing,
                    report.traced_peak_bytes,
                    report.peak_allocated_bytes,
                    report.peak_reserved_bytes,
                    report.peak_phase,
                    time.perf_counter() - started,
                    time.process_time() - cpu,
                )
            )
    return points


def _measure_on_gpu(spec: WorkloadSpec, batch_size: int, checkpointing: bool) -> tuple[int, int] | None:
    import torch

    from probes.step import run_train_steps
    from probes.workloads import build_workload

    try:
        workload = build_workload(spec, device="cuda", gradient_checkpointing=checkpointing)
        torch.cuda.reset_peak_memory_stats()
        run_train_steps(workload, batch_size, iterations=2, synchronize=torch.cuda.synchronize)
    except torch.OutOfMemoryError:
        return None
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", type=Path, default=WORKLOADS, help="A folder of specs, or one spec.")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--loops", default="keeps,releases", help="loop shapes: keeps, releases or both")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    loops = [loop.strip() for loop in args.loops.split(",")]
    gpu = run_in_child(_has_cuda, timeout=120, what="CUDA check")

    header = (
        "| workload | loop | b | ckpt | traced MiB | est. allocated MiB | est. reserved MiB | phase "
        "| s | CPU s |"
    )
    if gpu:
        header += " real allocated MiB | real reserved MiB | alloc ratio | reserved ratio |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    paths = [args.workloads] if args.workloads.is_file() else sorted(args.workloads.glob("*.json"))
    for path in paths:
        for loop in loops:
            base = load_workload_file(str(path))
            spec = base.model_copy(update={"loop": LoopSpec(keeps_outputs=loop == "keeps")})
            points: list[Point] = run_in_child(
                _estimate_all, spec, path.stem, loop, batch_sizes, timeout=3600,
                what=f"estimates of {path.stem}",
            )
            for p in points:
                print(_row(p, spec, gpu), flush=True)
    print(f"\ndevice model: {DEFAULT_DEVICE_MODEL}")


def _row(p: Point, spec: WorkloadSpec, gpu: bool) -> str:
    checkpointing = "on" if p.checkpointing else "off"
    row = (
        f"| {p.workload} | {p.loop} | {p.batch_size} | {checkpointing} | {p.traced / MIB:,.0f} "
        f"| {p.allocated / MIB:,.0f} | {p.reserved / MIB:,.0f} | {p.phase} | {p.seconds:.2f} "
        f"| {p.cpu_seconds:.2f} |"
    )
    if not gpu:
        return row
    real = run_in_child(
        _measure_on_gpu, spec, p.batch_size, p.checkpointing, timeout=900, what="GPU measurement"
    )
    if real is None:
        return row + " OOM | OOM | | |"
    allocated, reserved = real
    return row + (
        f" {allocated / MIB:,.0f} | {reserved / MIB:,.0f} | {p.allocated / allocated:.3f} "
        f"| {p.reserved / reserved:.3f} |"
    )


if __name__ == "__main__":
    main()
