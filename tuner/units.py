"""Byte sizes: parse `80GiB`, `40GB`, `512MiB`; format bytes for people."""

from __future__ import annotations

import re

from tuner.errors import SpecError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in `text`: a plain integer or a number with a unit (`80GiB`, `40GB`, `512MiB`)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise SpecError(f"{text!r} is not a size: expected bytes or a number with a unit like 80GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(num_bytes: int | float | None) -> str:
    """`1.50 GiB` style, binary units, for tables and pages."""
    if num_bytes is None:
        return "—"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
