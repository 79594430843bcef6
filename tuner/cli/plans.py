"""`tuner plans` (docs/contract.md): past plans, newest first, from a tuner service or straight from the
local database, as a table or as JSON (`{"items": [...], "total": N}`, the `GET /v1/plans` shape)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from tuner.cli._common import clear_errors, fail, print_json

if TYPE_CHECKING:
    from tuner.client import PlanPage
    from tuner.results import Plan

MAX_LIMIT = 200
"""The most plans one page holds (the API's bound too)."""


def plans(
    server: Annotated[
        str | None, typer.Option("--server", help="Tuner service URL (default: TUNER_SERVER; none: --db).")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db", help="Without a server: the database URL (default: TUNER_DATABASE_URL, else ./tuner.db)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_LIMIT, help="Plans to show.")] = 20,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many of the newest plans.")] = 0,
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (as listed: gpt2, resnet50, mlp…).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Only this device name, exactly.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"items": [...], "total": N}.')] = False,
) -> None:
    """List past plans, newest first."""
    with clear_errors():
        from tuner.settings import get_settings

        settings = get_settings()
        if server and db:
            fail("Give either --server or --db, not both.")
        server_url = None if db else (server or settings.server)
        if server_url:
            page = _from_server(server_url, limit=limit, offset=offset, model=model, device=device)
            source = server_url
        else:
            url = db or settings.database_url
            page = _from_database(url, limit=limit, offset=offset, model=model, device=device)
            source = _redacted(url)
        if as_json:
            print_json(page)
        else:
            _print_table(page, offset=offset, source=source, filtered=bool(model or device))


def _from_server(url: str, *, limit: int, offset: int, model: str | None, device: str | None) -> PlanPage:
    from tuner.client import TunerClient
    from tuner.settings import get_settings

    token = get_settings().api_token
    with TunerClient(url, token=token.get_secret_value() if token else None) as client:
        return client.list_plans(limit, offset, model=model, device_name=device)


def _from_database(url: str, *, limit: int, offset: int, model: str | None, device: str | None) -> PlanPage:
    from sqlalchemy.exc import SQLAlchemyError

    from storage import repository
    from storage.db import current_revision, make_engine
    from tuner.client import PlanPage

    if _missing_sqlite_file(url):
        # Listing must not create a database: an absent file simply holds no plans.
        return PlanPage(items=[], total=0)
    engine = make_engine(url)
    try:
        if current_revision(engine) is None:
            fail(f"{_redacted(url)} has no tuner schema; run 'tuner db upgrade --db URL' first.")
        found, total = repository.list_plans(
            engine, limit=limit, offset=offset, model=model, device_name=device
        )
    except SQLAlchemyError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"Cannot read plans from {_redacted(url)}: {first_line}")
    finally:
        engine.dispose()
    return PlanPage(items=found, total=total)


def _missing_sqlite_file(url: str) -> bool:
    from pathlib import Path

    from sqlalchemy import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or database.startswith("file:")
    return (
        parsed.get_backend_name() == "sqlite" and not in_memory and not Path(database).expanduser().exists()
    )


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


def _print_table(page: PlanPage, *, offset: int, source: str, filtered: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    # Piped output is not cut to 80 columns: rows stay whole for grep and friends.
    out = Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 200)
    if not page.items:
        if page.total:
            out.print(f"No plans past the first {page.total} in {source}.", markup=False)
        else:
            out.print(f"No plans {'match in' if filtered else 'in'} {source}.", markup=False)
        return
    first, last = offset + 1, offset + len(page.items)
    out.print(
        f"Plans {first}–{last} of {page.total}{' matching' if filtered else ''} in {source}", markup=False
    )
    table = Table()
    table.add_column("id", justify="right")
    table.add_column("created")
    table.add_column("model")
    table.add_column("device")
    table.add_column("backend")
    table.add_column("effective", justify="right")
    table.add_column("micro × accum × world")
    table.add_column("ckpt")
    table.add_column("peak / budget", justify="right")
    for plan in page.items:
        table.add_row(*_cells(plan))
    out.print(table)


def _cells(plan: Plan) -> list[str]:
    from rich.markup import escape

    from tuner.units import format_bytes

    if plan.micro_batch_sizes:
        split = f"{'+'.join(str(s) for s in plan.micro_batch_sizes)} × {plan.world_size}"
        if len(split) > 30:
            split = (
                f"uneven {len(plan.micro_batch_sizes)} × ≤{max(plan.micro_batch_sizes)} × {plan.world_size}"
            )
    else:
        split = f"{plan.micro_batch_size} × {plan.accumulation_steps} × {plan.world_size}"
    created = plan.created_at.strftime("%Y-%m-%d %H:%M") if plan.created_at else "—"
    peak = f"{format_bytes(plan.predicted_peak_bytes)} / {format_bytes(plan.memory_budget_bytes)}"
    cells = [
        str(plan.id),
        created,
        plan.workload.describe(),
        plan.device.name,
        plan.backend,
        str(plan.effective_batch_size),
        split,
        "on" if plan.gradient_checkpointing else "off",
        peak,
    ]
    # Model and device names are user text: shown as written, never read as rich markup.
    return [escape(cell) for cell in cells]
