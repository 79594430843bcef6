"""Peak memory against micro-batch, drawn in the terminal: one bar a trial, in order of batch
size, scaled to the device's capacity, so the curve and its distance from the limit show at a
glance (the web page draws the same curve as SVG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.search_types import Trial
from tuner.units import format_bytes

_EIGHTHS = " ▏▎▍▌▋▊▉"


@dataclass(frozen=True)
class ChartRow:
    """One trial's line: the label, the bar (plain text) and whether the trial fit."""

    label: str
    bar: str
    value: str
    ok: bool


def bar(fraction: float, width: int) -> str:
    """A bar of `fraction` × `width` cells in eighth-cell steps, padded to `width`; a fraction
    above 1 fills the width and ends in `▶` (the peak went past the capacity)."""
    if fraction > 1:
        return "█" * (width - 1) + "▶"
    eighths = round(max(0.0, fraction) * width * 8)
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[rest] if rest else "")
    return text.ljust(width)


def memory_chart_rows(trials: Sequence[Trial], capacity_bytes: int, *, width: int = 40) -> list[ChartRow]:
    """Rows for each trial, sorted by batch size (trials of one size keep their order).

    The bar is the peak *reserved* bytes (what runs out); a trial that ran out of memory before
    its peak was known has no bar.
    """
    label_width = max((len(str(t.batch_size)) for t in trials), default=1)
    rows = []
    for trial in sorted(trials, key=lambda t: t.batch_size):
        peak = trial.peak_reserved_bytes
        drawn = " " * width if peak is None else bar(peak / capacity_bytes, width)
        value = format_bytes(peak) if peak is not None else "—"
        if not trial.ok:
            value += "  out of memory"
        rows.append(ChartRow(f"b={trial.batch_size:<{label_width}}", drawn, value, trial.ok))
    return rows


def memory_chart_lines(trials: Sequence[Trial], capacity_bytes: int, *, width: int = 40) -> list[str]:
    """The chart as rich-markup lines: a title naming the capacity, then one line a trial with the
    capacity drawn as `│` after the bar's full width."""
    title = f"Peak reserved memory by micro-batch (│ = the device's {format_bytes(capacity_bytes)})"
    lines = [title]
    for row in memory_chart_rows(trials, capacity_bytes, width=width):
        colour = "green" if row.ok else "red"
        lines.append(f"  {row.label} [{colour}]{row.bar}[/]│ {row.value}")
    return lines
