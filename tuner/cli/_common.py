"""Helpers shared by the CLI commands: errors as one clear line, JSON output, sizes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console

from tuner.errors import TunerError

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line on stderr and exit."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def not_built(command: str) -> NoReturn:
    """For a command of CONTRACT.md that this version does not implement yet."""
    fail(f"'tuner {command}' is not available in this version yet.", code=2)


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn a `TunerError` into one line on stderr and exit code 1."""
    try:
        yield
    except TunerError as exc:
        fail(exc.message)


def print_json(document: Any) -> None:
    """One JSON document on stdout, following the HTTP shapes."""
    if isinstance(document, BaseModel):
        text = document.model_dump_json(indent=2)
    else:
        text = json.dumps(document, indent=2, default=_default)
    sys.stdout.write(text + "\n")


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    return str(value)


def on_off(flag: bool) -> str:
    """How the output names a checkpointing choice."""
    return "on" if flag else "off"


def size_option(value: str | None) -> int | None:
    """Parse a `--device-memory 80GiB` style option."""
    if value is None:
        return None
    from tuner.units import parse_size

    return parse_size(value)


Callback = Callable[..., None]
