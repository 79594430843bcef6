"""`tuner db …`: database maintenance."""

from __future__ import annotations

import typer

from tuner.cli._common import not_built

app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


@app.command("upgrade")
def upgrade() -> None:
    """Migrate the database to the newest schema."""
    not_built("db upgrade")
