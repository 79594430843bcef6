"""`tuner probe` (docs/contract.md): the largest micro-batch of a workload on a device, and every trial.

torch is imported only inside the command (through `probes`), so `tuner --help` stays instant.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import TYPE_CHECKING

import typer

from tuner.cli._common import clear_errors, on_off, print_json, size_option
from tuner.cli._memory_chart import memory_chart_lines
from tuner.cli._options import (
    ALLOC_CONF_HELP,
    MAX_TRIALS,
    PARALLELISM_HELP,
    BackendChoice,
    alloc_conf_option,
    local_gpu,
    parallelism_option,
    resolve_backend,
    target_device,
)
from tuner.cli._progress import trial_progress
from tuner.search_types import DEFAULT_MAX_BATCH_SIZE

if TYPE_CHECKING:
    from tuner.parallelism import ParallelSetup
    from tuner.results import ProbeResult
    from tuner.search_types import SearchConfig
    from tuner.spec import Backend, DeviceSpec, WorkloadSpec


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
        None,
        "--device-memory",
        help="Target device memory, e.g. 80GiB or 40GB: the estimate's card, or with --backend cuda a "
        "smaller card emulated on this GPU.",
    ),
    device_name: str | None = typer.Option(None, "--device-name", help="Target device name (estimate)."),
    strategy: StrategyChoice = typer.Option(StrategyChoice.guided, "--strategy", help="Search strategy."),
    checkpointing: OnOff = typer.Option(OnOff.off, "--checkpointing", help="Gradient checkpointing."),
    max_batch_size: int = typer.Option(
        DEFAULT_MAX_BATCH_SIZE, "--max-batch-size", help="Never try a larger micro-batch."
    ),
    max_trials: int = typer.Option(MAX_TRIALS, "--max-trials", help="Trial budget of the search."),
    verify_steps: int = typer.Option(
        0,
        "--verify-steps",
        help="cuda: run the answer this many steps in a fresh process, stepping down on failure.",
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds before the probe is stopped."),
    alloc_conf: str | None = typer.Option(
        None, "--alloc-conf", envvar="PYTORCH_CUDA_ALLOC_CONF", help=ALLOC_CONF_HELP
    ),
    parallelism: str | None = typer.Option(None, "--parallelism", help=PARALLELISM_HELP),
    world_size: int = typer.Option(
        1, "--world-size", help="Data-parallel ranks of the job one rank of which is probed."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the probe result as JSON."),
) -> None:
    """Find the largest micro-batch that fits, with a progress bar on a terminal."""
    with clear_errors():
        from tuner.search_types import SearchConfig
        from tuner.spec import load_workload_file

        workload = load_workload_file(spec)
        parallel = parallelism_option(parallelism, world_size)
        _check_fsdp_family(workload, parallel)
        total_memory = size_option(device_memory)
        device = target_device(total_memory, device_name)
        chosen = resolve_backend(backend, total_memory)
        if chosen == "estimate" and device is None:
            device = local_gpu()
        search = SearchConfig(
            strategy=strategy.value,
            max_batch_size=max_batch_size,
            max_trials=max_trials,
        )
        result = _run(
            workload,
            chosen,
            device,
            checkpointing=checkpointing is OnOff.on,
            search=search,
            verify_steps=verify_steps,
            timeout=timeout,
            show_progress=sys.stderr.isatty(),
            alloc_conf=alloc_conf_option(alloc_conf),
            parallel=parallel,
        )
    if as_json:
        print_json(result)
    else:
        print_probe(result)


def _run(
    workload: WorkloadSpec,
    backend: Backend,
    device: DeviceSpec | None,
    *,
    checkpointing: bool,
    search: SearchConfig,
    verify_steps: int,
    timeout: float | None,
    show_progress: bool,
    alloc_conf: str | None = None,
    parallel: ParallelSetup | None = None,
) -> ProbeResult:
    from probes.probe import run_probe
    from tuner.parallelism import SINGLE
    from tuner.settings import get_settings

    settings = get_settings()
    with trial_progress(workload, backend, checkpointing, show=show_progress) as bar:
        result = run_probe(
            workload,
            backend=backend,
            device=device,
            gradient_checkpointing=checkpointing,
            search=search,
            verify_steps=verify_steps,
            timeout=settings.probe_timeout_seconds if timeout is None else timeout,
            prior_timeout=settings.estimate_timeout_seconds,
            progress=bar.advance,
            alloc_conf=alloc_conf,
            parallel=parallel or SINGLE,
        )
        bar.done(result)
    return result


def _check_fsdp_family(workload: WorkloadSpec, parallel: ParallelSetup) -> None:
    from tuner.cli._common import fail
    from tuner.spec import fsdp_wrappable

    if parallel.parallelism.strategy == "fsdp" and not fsdp_wrappable(workload.model):
        fail(
            f"--parallelism: 'fsdp' needs a model of repeated blocks to shard one by one; "
            f"{workload.model.family} models are not wrapped per block (use 'ddp')."
        )


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
    for line in memory_chart_lines(result.trials, result.device.total_memory_bytes):
        out.print(line, highlight=False)
    checkpointing = on_off(result.gradient_checkpointing)
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
    memory = result.extra.get("memory_per_rank")
    if result.parallelism or memory:
        from tuner.cli.plan import MEMORY_CATEGORIES
        from tuner.parallelism import ParallelSetup

        rank = ParallelSetup.from_key(result.parallelism).describe()
        parts = [
            f"{name.replace('_', ' ')} {format_bytes(memory[name])}"
            for name in MEMORY_CATEGORIES
            if isinstance(memory, dict) and memory.get(name)
        ]
        out.print(f"One rank of {rank}" + (": " + ", ".join(parts) if parts else "."), highlight=False)
