"""One rank's memory under each data-parallel strategy, estimated without GPUs.

    python bench/parallelism.py                          # Llama 1.1B at seq 2048, both clusters
    python bench/parallelism.py --workload W.json --cluster 8x40GB --strategies none,fsdp

For each cluster (`RANKSxCARD`, e.g. `8x40GB`) and strategy (none, ddp, fsdp), the estimate
backend's guided search (`probes.estimate.session.search_max_batch`, checkpointing off and on,
the planner's 5 % margin) finds the largest micro-batch one rank fits; the table gives it, one rank's
traced bytes per category at that micro-batch's peak (parameters, gradients, DDP's buckets,
optimizer state, activations), the trials and the seconds the search took on this machine.
`none` and `ddp` hold the same at every world size, so their traces are shared between clusters
of the same card (the seconds column says so); FSDP is traced at each world size.

The emulation the estimate installs is process-global: this script is such a process.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tuner.parallelism import ParallelismSpec, ParallelSetup  # noqa: E402
from tuner.search_types import SearchConfig  # noqa: E402
from tuner.spec import load_workload_file  # noqa: E402
from tuner.units import format_bytes, parse_size  # noqa: E402

DEFAULT_WORKLOAD = REPO.parent / "shared" / "bench" / "workloads" / "llama-1.1b-seq2048.json"
DEFAULT_CLUSTERS = ("8x40GB", "64x24GB")
MARGIN = 0.05
CATEGORIES = ("parameters", "gradients", "buckets", "optimizer_state", "activations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="Workload spec JSON.")
    parser.add_argument("--cluster", action="append", help="RANKSxCARD, e.g. 8x40GB (repeatable).")
    parser.add_argument("--strategies", default="none,ddp,fsdp", help="Comma-separated strategies.")
    parser.add_argument("--max-trials", type=int, default=12)
    parser.add_argument("--checkpointing", default="off,on", help="off, on or both (comma-separated).")
    args = parser.parse_args()

    from probes.estimate.session import current_session, search_max_batch

    workload = load_workload_file(args.workload)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    clusters = [_cluster(text) for text in (args.cluster or DEFAULT_CLUSTERS)]
    session = current_session()
    print(f"{workload.describe()} ({Path(args.workload).name}), {MARGIN:.0%} margin")
    print(f"machine: {platform.processor() or platform.machine()}, {_cpus()} CPUs, no GPU\n")
    header = ["cluster", "strategy", "ckpt", "largest micro-batch", *CATEGORIES, "trials", "seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    choices = [c.strip() == "on" for c in args.checkpointing.split(",") if c.strip()]
    for ranks, card, label in clusters:
        for strategy, checkpointing in ((s, c) for s in strategies for c in choices):
            setup = ParallelSetup(parallelism=ParallelismSpec(strategy=strategy), world_size=ranks)  # type: ignore[arg-type]
            started = time.perf_counter()
            result = search_max_batch(
                workload,
                card,
                gradient_checkpointing=checkpointing,
                memory_margin=MARGIN,
                search=SearchConfig(max_trials=args.max_trials),
                parallel=setup,
            )
            seconds = time.perf_counter() - started
            best = result.max_batch_size
            categories = (
                session.trace(workload, best, gradient_checkpointing=checkpointing, parallel=setup).categories
                if best > 0
                else dict.fromkeys(CATEGORIES, 0)
            )
            row = [
                label,
                setup.describe(),
                "on" if checkpointing else "off",
                str(best),
                *(format_bytes(categories.get(name, 0)) for name in CATEGORIES),
                str(len(result.trials)),
                f"{seconds:.0f}",
            ]
            print("| " + " | ".join(row) + " |", flush=True)


def _cluster(text: str) -> tuple[int, int, str]:
    ranks, _, card = text.lower().partition("x")
    return int(ranks), parse_size(card), f"{int(ranks)} × {card.upper()}"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    main()
