"""Guided search against Lightning's doubling and Accelerate's back-off, in the same run.

    python bench/probe_strategies.py --synthetic            # CPU: the synthetic devices of the tests
    python bench/probe_strategies.py --backend estimate --device-memory 80GiB   # CPU: real traces
    python bench/probe_strategies.py --out gpu-out/probe_strategies.md   # GPU: the bench workloads

GPU mode: for each workload of ../shared/bench/workloads (or --workloads), checkpointing off and
on, every strategy runs through `probes.probe.run_probe` (cuda backend, a child process per
search); each answer is then run for --verify-steps in a fresh process. Columns: trials, wall
seconds from the call to the answer (the search child's start-up and model build, and guided's
prior, traced meanwhile, included; verification not), largest batch, whether the answer
survived verification, and the seconds as a fraction of doubling's.

Estimate mode (`--backend estimate --device-memory SIZE`): the same searches, each trial a
fake-tensor trace of the canonical step for a card of SIZE (no GPU, no verification): how many
trials and CPU seconds each strategy spends on the real memory curves of the bench workloads.

Synthetic mode: the same table over the memory models of tests/unit/synthetic_devices.py, with
seconds from each device's time model (a trial costs a fixed part plus a per-sample part; an
out-of-memory trial stops half-way). Guided gets the device's prior line off by +5 %, and, in a
second row, no prior. Back-off starts at 4 × the true maximum (a generous guess). Verification
repeats the answer on the same device (a lucky pass fails it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tuner.search import STRATEGIES, find_max_batch  # noqa: E402
from tuner.search_types import SearchConfig  # noqa: E402
from tuner.spec import DeviceSpec, load_workload_file  # noqa: E402
from tuner.units import format_bytes, parse_size  # noqa: E402

DEFAULT_WORKLOADS = REPO.parent / "shared" / "bench" / "workloads"
BACKOFF_START = 256
"""Where back-off starts on a GPU (Accelerate's users pick a generous guess; 256 is above every
bench workload's maximum without checkpointing)."""


@dataclass
class Row:
    workload: str
    checkpointing: str
    strategy: str
    trials: int
    seconds: float
    largest: int
    verified: str
    stop_reason: str


def synthetic_rows(prior_error: float = 0.05) -> list[Row]:
    from tests.unit.synthetic_devices import table

    rows = []
    for device in table():
        top = device.max_batch_size
        runs = [("guided (prior +5%)", "guided", True), ("guided (no prior)", "guided", False)]
        runs += [(s, s, False) for s in STRATEGIES if s != "guided"]
        for label, strategy, with_prior in runs:
            fresh = device.fresh()
            result = find_max_batch(
                fresh.fits,
                strategy=strategy,  # type: ignore[arg-type]
                capacity_bytes=fresh.capacity,
                prior=fresh.prior(prior_error) if with_prior else None,
                max_batch_size=min(top, 4 * max(device.true_max, 1)) if strategy == "backoff" else top,
                max_trials=64,
            )
            answer = result.max_batch_size
            verified = "—" if answer == 0 else ("yes" if fresh.fits(answer).ok else "no")
            rows.append(
                Row(
                    device.name,
                    "n/a",
                    label,
                    len(result.trials),
                    sum(t.seconds for t in result.trials),
                    answer,
                    f"{verified} (true {device.true_max})",
                    result.stop_reason,
                )
            )
    return rows


def probe_rows(
    workloads: list[Path],
    strategies: list[str],
    *,
    backend: str,
    device: DeviceSpec | None,
    verify_steps: int,
    budget: float,
) -> list[Row]:
    """Every strategy through `run_probe` on each workload, checkpointing off and on."""
    from probes.probe import run_probe
    from tuner.errors import TunerError

    rows = []
    deadline = time.monotonic() + budget
    for path in workloads:
        spec = load_workload_file(str(path))
        for checkpointing in (False, True):
            for strategy in strategies:
                if time.monotonic() > deadline:
                    print(f"time budget spent: skipping {path.stem} {strategy}", file=sys.stderr)
                    continue
                label = "on" if checkpointing else "off"
                started = time.monotonic()
                try:
                    result = run_probe(
                        spec,
                        backend=backend,  # type: ignore[arg-type]
                        device=device,
                        gradient_checkpointing=checkpointing,
                        search=SearchConfig(
                            strategy=strategy,  # type: ignore[arg-type]
                            max_batch_size=BACKOFF_START * (4 if checkpointing else 1)
                            if strategy == "backoff"
                            else 65536,
                            max_trials=40,
                        ),
                        verify_steps=verify_steps,
                        timeout=max(60.0, deadline - time.monotonic()),
                    )
                except TunerError as exc:
                    rows.append(
                        Row(
                            path.stem, label, strategy, 0, time.monotonic() - started, 0, exc.message, "error"
                        )
                    )
                    continue
                # Wall time up to the answer, before verification: the search child's start-up
                # and model build, and for guided its prior (traced meanwhile), count for all.
                search_seconds = float(result.extra.get("search_wall_seconds", result.seconds))
                attempts = result.extra.get("verification", [])
                verified = "—"
                if verify_steps and isinstance(attempts, list) and attempts:
                    verified = "yes" if attempts[0]["ok"] else f"stepped down to {result.max_batch_size}"
                found = (
                    attempts[0]["batch_size"]
                    if isinstance(attempts, list) and attempts
                    else result.max_batch_size
                )
                rows.append(
                    Row(
                        path.stem,
                        label,
                        strategy,
                        len(result.trials),
                        search_seconds,
                        found,
                        verified,
                        result.stop_reason,
                    )
                )
                print(json.dumps(rows[-1].__dict__), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[Row], machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| workload | ckpt | strategy | trials | seconds | largest | verified | stop | vs doubling |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    doubling = {(r.workload, r.checkpointing): r.seconds for r in rows if r.strategy == "doubling"}
    for r in rows:
        base = doubling.get((r.workload, r.checkpointing))
        ratio = f"{r.seconds / base:.2f}×" if base else "—"
        lines.append(
            f"| {r.workload} | {r.checkpointing} | {r.strategy} | {r.trials} | {r.seconds:.1f} | {r.largest} "
            f"| {r.verified} | {r.stop_reason} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic", action="store_true", help="Synthetic devices (no GPU needed).")
    parser.add_argument(
        "--workloads", nargs="*", type=Path, help="Workload spec files (default: shared bench)."
    )
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument(
        "--backend", choices=["cuda", "estimate"], default="cuda", help="Trials on this GPU, or traces."
    )
    parser.add_argument(
        "--device-memory",
        type=parse_size,
        help="the card's memory (e.g. 80GiB): the estimate's target, or a smaller card emulated on this GPU.",
    )
    parser.add_argument("--verify-steps", type=int, default=10, help="cuda: steps in a fresh process.")
    parser.add_argument(
        "--time-budget", type=float, default=300.0, help="Seconds; later searches are skipped."
    )
    parser.add_argument("--out", type=Path, help="Also write the markdown table here.")
    args = parser.parse_args()
    if args.synthetic:
        rows = synthetic_rows()
        machine = f"synthetic devices (simulated trial seconds), run on {platform.machine()} CPU"
    else:
        workloads = args.workloads or sorted(DEFAULT_WORKLOADS.glob("*.json"))
        device = None
        if args.backend == "estimate" and args.device_memory is None:
            parser.error("--backend estimate needs --device-memory (e.g. 80GiB).")
        if args.device_memory is not None:
            memory = format_bytes(args.device_memory)
            device = DeviceSpec(name=f"GPU with {memory}", total_memory_bytes=args.device_memory)
        if args.backend == "estimate":
            machine = f"estimate backend for a {memory} card, traced on {_cpu_name()}"
        elif device is not None:
            machine = f"a {memory} card emulated on {_gpu_name()} (the allocator capped at its share)"
        else:
            machine = _gpu_name()
        rows = probe_rows(
            workloads,
            args.strategies,
            backend=args.backend,
            device=device,
            verify_steps=args.verify_steps if args.backend == "cuda" else 0,
            budget=args.time_budget,
        )
    text = markdown(rows, machine)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{os.cpu_count()} cores of {models[0] if models else platform.machine()}"


def _gpu_name() -> str:
    from probes.local_gpu import detect_local_gpu

    device = detect_local_gpu()
    return "no GPU" if device is None else f"{device.name} ({device.total_memory_bytes / 2**30:.1f} GiB)"


if __name__ == "__main__":
    main()
