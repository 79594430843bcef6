"""Values written for people on the pages (the templates' filters)."""

from __future__ import annotations

from datetime import UTC, datetime

from tuner.search_types import MOVE_REASONS


def format_time(moment: datetime | None) -> str:
    """`2025-01-31 14:05 UTC`; stored times are UTC (naive ones from SQLite included)."""
    if moment is None:
        return "—"
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_count(count: int | None) -> str:
    """Parameter counts for people: `124.4M`, `1.10B`, `8,192`."""
    if count is None:
        return "—"
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M")):
        if count >= size:
            value = count / size
            return f"{value:.2f}{suffix}" if value < 10 else f"{value:.1f}{suffix}"
    return f"{count:,}"


def format_move(move: str | None) -> str:
    """Why the guided search ran a trial (`Trial.move`), in the words the CLI uses."""
    return MOVE_REASONS.get(move, move) if move else "—"
