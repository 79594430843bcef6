"""`tuner estimate SPEC.json --batch-size B [--checkpointing] [--json]` (docs/contract.md): the
predicted peak memory of one train step, without a GPU."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer

from tuner.cli._common import clear_errors, on_off, print_json

_PHASE_ORDER = ("forward", "backward", "optimizer")


def estimate(
    spec: Annotated[str, typer.Argument(help="Workload spec JSON file.")],
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Micro-batch size.")],
    checkpointing: Annotated[
        bool, typer.Option("--checkpointing", help="Trace with gradient checkpointing on.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Predict the peak GPU memory of one train step at a micro-batch size, without a GPU."""
    with clear_errors():
        from probes.estimate.remote import estimate_peak
        from tuner.settings import get_settings
        from tuner.spec import load_workload_file

        workload = load_workload_file(spec)
        report = estimate_peak(
            workload,
            batch_size,
            gradient_checkpointing=checkpointing,
            timeout=get_settings().estimate_timeout_seconds,
        )
    document = asdict(report)
    document.pop("ops", None)
    if as_json:
        print_json(document)
    else:
        _print_table(workload.describe(), document)


def _print_table(name: str, report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from tuner.units import format_bytes

    checkpointing = on_off(report["gradient_checkpointing"])
    table = Table(
        title=f"{name}, micro-batch {report['batch_size']}, checkpointing {checkpointing}",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("predicted peak allocated", format_bytes(report["peak_allocated_bytes"]))
    table.add_row("predicted peak reserved", format_bytes(report["peak_reserved_bytes"]))
    table.add_row("peak phase", f"{report['peak_phase']} (iteration {report['peak_iteration'] + 1})")
    table.add_row("traced peak", format_bytes(report["traced_peak_bytes"]))
    for category, nbytes in report["categories"].items():
        table.add_row(f"  {category.replace('_', ' ')}", format_bytes(nbytes))
    for phase in _PHASE_ORDER:
        if phase in report["peak_by_phase"]:
            table.add_row(f"traced peak in {phase}", format_bytes(report["peak_by_phase"][phase]))
    table.add_row("seconds", f"{report['seconds']:.2f}")
    Console().print(table)
