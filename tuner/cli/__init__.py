"""The `tuner` command line. Each command lives in a module of its own; heavy imports (torch,
the API) happen inside the commands, so `tuner --help` is instant."""

from __future__ import annotations

import typer

from tuner.cli import db, estimate, plan, plans, probe, serve, worker

app = typer.Typer(
    name="tuner",
    help="Memory-budget auto-tuner for PyTorch training: the largest micro-batch that fits, "
    "and the accumulation plan that reaches your effective batch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve.serve)
app.command("worker")(worker.worker)
app.command("estimate")(estimate.estimate)
app.command("probe")(probe.probe)
app.command("plan")(plan.plan)
app.command("plans")(plans.plans)
app.add_typer(db.app, name="db")


def main() -> None:
    """Console-script entry point."""
    app()
