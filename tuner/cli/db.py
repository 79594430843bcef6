"""`tuner db …`: database maintenance (Alembic migrations of the tuner's schema)."""

from __future__ import annotations

from typing import Annotated

import typer

from tuner.cli._common import console, fail

app = typer.Typer(help="Database maintenance.", no_args_is_help=True)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (default: TUNER_DATABASE_URL, else ./tuner.db)."),
]


def _database_url(db: str | None) -> str:
    if db:
        return db
    from tuner.settings import get_settings

    return get_settings().database_url


@app.command("upgrade")
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    db: DbOption = None,
) -> None:
    """Migrate the database to the newest schema (or to REVISION)."""
    _migrate("upgrade", revision, db)


@app.command("downgrade")
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target: -1 (one step), base (empty), or an id.")] = "-1",
    db: DbOption = None,
) -> None:
    """Undo migrations down to REVISION (one step by default)."""
    _migrate("downgrade", revision, db)


@app.command("current")
def current(db: DbOption = None) -> None:
    """Print the revision the database is at."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import current_revision, make_engine

    url = _database_url(db)
    engine = make_engine(url)
    try:
        revision = current_revision(engine)
    except SQLAlchemyError as exc:
        fail(f"Cannot read the schema revision of {_safe(url)}: {_one_line(exc)}")
    finally:
        engine.dispose()
    typer.echo(revision or "none (not migrated)")


def _migrate(direction: str, revision: str, db: str | None) -> None:
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import current_revision, downgrade_schema, make_engine, upgrade_schema

    url = _database_url(db)
    try:
        engine = make_engine(url)
    except (SQLAlchemyError, ValueError) as exc:
        fail(f"Cannot use database URL {_safe(url)}: {_one_line(exc)}")
    try:
        before = current_revision(engine)
        if direction == "upgrade":
            upgrade_schema(engine, revision)
        else:
            downgrade_schema(engine, revision)
        after = current_revision(engine)
    except CommandError as exc:
        fail(f"Cannot {direction} to {revision!r}: {_one_line(exc)}")
    except SQLAlchemyError as exc:
        fail(f"Cannot {direction} {_safe(url)}: {_one_line(exc)}")
    finally:
        engine.dispose()
    console.print(f"{_safe(url)}: {before or 'empty'} → {after or 'empty'}", highlight=False)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def _one_line(exc: BaseException) -> str:
    words = str(getattr(exc, "orig", None) or exc).split()
    return " ".join(words)[:300] if words else type(exc).__name__
