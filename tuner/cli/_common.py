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
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, unwrapped
    raise typer.Exit(code)


def not_built(command: str) -> NoReturn:
    """For a command of docs/contract.md that this version does not implement yet."""
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


MIN_DEVICE_BYTES = 1 << 20
MAX_DEVICE_BYTES = 1 << 44
"""The device memory a spec accepts (`tuner.spec.DeviceSpec`): 1 MiB to 16 TiB."""


def size_option(value: str | None, flag: str = "--device-memory") -> int | None:
    """Parse a `--device-memory 80GiB` style option; a bad or implausible size is one error line
    naming the flag and the forms it takes (a bare `24` is 24 bytes, not 24 GiB)."""
    if value is None:
        return None
    from tuner.errors import SpecError
    from tuner.units import format_bytes, parse_size

    forms = "a size with a unit, e.g. 80GiB, 40GB or 512MiB"
    try:
        size = parse_size(value)
    except SpecError:
        fail(f"{flag} {value!r} is not a size: give {forms}.")
    if size < MIN_DEVICE_BYTES:
        fail(
            f"{flag} {value!r} is {size} bytes, less than any GPU: give {forms} (a bare number counts bytes)."
        )
    if size > MAX_DEVICE_BYTES:
        fail(
            f"{flag} {value!r} is {format_bytes(size)}, more than {format_bytes(MAX_DEVICE_BYTES)}: "
            f"give {forms}."
        )
    return size


Callback = Callable[..., None]
