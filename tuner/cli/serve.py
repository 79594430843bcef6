"""`tuner serve` (CONTRACT.md)."""

from __future__ import annotations

from tuner.cli._common import not_built


def serve() -> None:
    """Not built yet."""
    not_built("serve")
