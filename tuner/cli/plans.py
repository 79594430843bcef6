"""`tuner plans` (CONTRACT.md)."""

from __future__ import annotations

from tuner.cli._common import not_built


def plans() -> None:
    """Not built yet."""
    not_built("plans")
