"""`tuner probe` (CONTRACT.md): the largest micro-batch of a workload on a device, and every trial.

torch is imported only inside the command (through `probes`), so `tuner --help` stays instant.
"""

from __future__ import annotations

import functools
import sys
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from tuner.cli._common import clear_errors, fail, print_json, size_option

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from tuner.results import ProbeResult
    from tuner.search_types import Trial
    from tuner.spec import Backend, DeviceSpec, WorkloadSpec


class BackendChoice(StrEnum):
    cuda = "cuda"
    estimate = "estimate"


class StrategyChoice(StrEnum):
    guided = "guided"
    doubling = "doubling"
    backoff = "backoff"


class OnOff(StrEnum):
    on = "on"
    off = "off"


def probe(
    spec: str = typer.Argument(..., help="Workload spec JSON file."),
    backend: BackendChoice | None = typer.Option(
        None,
        "--backend",
        help="cuda: real trials on this machine's GPU; estimate: GPU-free trace for --device-memory. "
        "Default: cuda when a GPU is present, else estimate.",
        show_default=False,
    ),
    device_memory: str | None = typer.Option(
        None, "--device-memory", help="Target device memory for estimate, e.g. 80GiB or 40GB."
    ),
    device_name: str | None = typer.Option(None, "--device-name", help="Target device name (estimate)."),
    strategy: StrategyChoice = typer.Option(StrategyChoice.guided, "--strategy", help="Search strategy."),
    checkpointing: OnOff = typer.Option(OnOff.off, "--checkpointing", help="Gradient checkpointing."),
    max_batch_size: int = typer.Option(65536, "--max-batch-size", help="Never try a larger micro-batch."),
    max_trials: int = typer.Option(32, "--max-trials", help="Trial budget of the search."),
    verify_steps: int = typer.Option(
        0,
        "--verify-steps",
        help="cuda: run the answer this many steps in a fresh process, stepping down on failure.",
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds before the probe is stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print the probe result as JSON."),
) -> None:
    """Find the largest micro-batch that fits, with a progress bar on a terminal."""
    with clear_errors():
        from tuner.spec import load_workload_file

        workload = load_workload_file(spec)
        total_memory = size_option(device_memory)
        device = _device(total_memory, device_name)
        chosen: Backend
        if backend is not None:
            chosen = "cuda" if backend is BackendChoice.cuda else "estimate"
        else:
            chosen = _default_backend(device)
        if chosen == "estimate" and device is None:
            device = _local_gpu()
        if chosen == "cuda" and device is not None and total_memory is not None:
            fail("--device-memory is for the estimate backend; the cuda backend measures this machine's GPU.")
        result = _run(
            workload,
            chosen,
            device,
            checkpointing=checkpointing is OnOff.on,
            strategy=strategy.value,
            max_batch_size=max_batch_size,
            max_trials=max_trials,
            verify_steps=verify_steps,
            timeout=timeout,
            show_progress=sys.stderr.isatty(),
        )
    if as_json:
        print_json(result)
    else:
        print_probe(result)


def _device(total_memory: int | None, name: str | None) -> DeviceSpec | None:
    from tuner.spec import DeviceSpec
    from tuner.units import format_bytes

    if total_memory is None:
        if name is not None:
            fail("--device-name needs --device-memory as well.")
        return None
    return DeviceSpec(name=name or f"GPU with {format_bytes(total_memory)}", total_memory_bytes=total_memory)


@functools.cache
def _local_gpu() -> DeviceSpec | None:
    from probes.local_gpu import detect_local_gpu

    return detect_local_gpu()


def _default_backend(device: DeviceSpec | None) -> Backend:
    """cuda on a machine with a GPU (unless a target device was given), else estimate."""
    if device is not None:
        return "estimate"
    return "cuda" if _local_gpu() is not None else "estimate"


def _run(
    workload: WorkloadSpec,
    backend: Backend,
    device: DeviceSpec | None,
    *,
    checkpointing: bool,
    strategy: str,
    max_batch_size: int,
    max_trials: int,
    verify_steps: int,
    timeout: float | None,
    show_progress: bool,
) -> ProbeResult:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from probes.probe import run_probe
    from tuner.cli._common import console

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} trials"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
        transient=False,
    )
    title = f"{workload.describe()} ({backend}, checkpointing {'on' if checkpointing else 'off'})"
    with progress:
        task = progress.add_task(f"Probing {title}", total=max_trials)
        result = run_probe(
            workload,
            backend=backend,
            device=device,
            gradient_checkpointing=checkpointing,
            strategy=strategy,  # type: ignore[arg-type]
            max_batch_size=max_batch_size,
            max_trials=max_trials,
            verify_steps=verify_steps,
            timeout=timeout,
            progress=lambda trial: _advance(progress, task, trial),
        )
        progress.update(task, total=len(result.trials), description=f"Probed {title}")
    return result


def _advance(progress: Progress, task: TaskID, trial: Trial) -> None:
    """One trial done: its batch size, memory and verdict on the bar, and a line above it."""
    progress.advance(task)
    if not progress.disable:
        progress.console.log(describe_trial(trial), highlight=False)


def describe_trial(trial: Trial) -> str:
    """`batch 48 fits (reserved 70.20 GiB, 3.1 s)` or `batch 96 does not fit (out of memory)`."""
    from tuner.units import format_bytes

    if not trial.ok:
        why = "out of memory" if trial.error in (None, "out_of_memory") else trial.error
        return f"batch {trial.batch_size} does not fit ({why}, {trial.seconds:.1f} s)"
    peak = trial.peak_reserved_bytes or trial.peak_allocated_bytes
    return f"batch {trial.batch_size} fits (reserved {format_bytes(peak)}, {trial.seconds:.1f} s)"


def print_probe(result: ProbeResult) -> None:
    """The trials as a table on stdout, then the answer."""
    from rich.console import Console
    from rich.table import Table

    from tuner.units import format_bytes

    out = Console()
    table = Table(title=f"Trials: {result.workload.describe()} on {result.device.name} ({result.backend})")
    for column in (
        "#",
        "batch",
        "verdict",
        "peak allocated",
        "peak reserved",
        "retries",
        "seconds",
        "samples/s",
    ):
        table.add_column(column, justify="left" if column == "verdict" else "right")
    for number, trial in enumerate(result.trials, start=1):
        table.add_row(
            str(number),
            str(trial.batch_size),
            "fits" if trial.ok else "[red]out of memory[/]",
            format_bytes(trial.peak_allocated_bytes),
            format_bytes(trial.peak_reserved_bytes),
            "—" if trial.num_alloc_retries is None else str(trial.num_alloc_retries),
            f"{trial.seconds:.2f}",
            "—" if trial.samples_per_second is None else f"{trial.samples_per_second:.1f}",
        )
    out.print(table)
    checkpointing = "on" if result.gradient_checkpointing else "off"
    if result.max_batch_size == 0:
        out.print(
            f"Nothing fits: not even batch size 1 with checkpointing {checkpointing} "
            f"({len(result.trials)} trials, {result.seconds:.1f} s).",
            highlight=False,
        )
        return
    how = f"{result.strategy}, {result.stop_reason}, {len(result.trials)} trials, {result.seconds:.1f} s"
    if result.verified_steps:
        how += f", verified for {result.verified_steps} steps"
    out.print(
        f"Largest micro-batch: [bold]{result.max_batch_size}[/] with checkpointing {checkpointing} ({how}).",
        highlight=False,
    )
