"""Peak memory against micro-batch, drawn in the terminal: one bar a trial, in order of batch
size, scaled to the device's capacity, so the curve and its distance from the limit show at a
glance (the web page draws the same curve as SVG)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tuner.search_types import Trial
from tuner.units import format_bytes

_EIGHTHS = " ▏▎▍▌▋▊▉"
_PLANNED = "◀ planned micro-batch"


@dataclass(frozen=True)
class ChartRow:
    """One line of the chart: the label, the bar (plain text), the value and its verdict."""

    batch_size: int
    label: str
    bar: str
    value: str
    ok: bool
    planned: bool = False


@dataclass(frozen=True)
class PlannedPoint:
    """A plan's micro-batch and the peak the planner predicts for it."""

    batch_size: int
    predicted_peak_bytes: int


def bar(fraction: float, width: int) -> str:
    """A bar of `fraction` × `width` cells in eighth-cell steps, padded to `width`; a fraction
    above 1 fills the width and ends in `▶` (the peak went past the capacity)."""
    if fraction > 1:
        return "█" * (width - 1) + "▶"
    eighths = round(max(0.0, fraction) * width * 8)
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[rest] if rest else "")
    return text.ljust(width)


def memory_chart_rows(
    trials: Sequence[Trial],
    capacity_bytes: int,
    *,
    width: int = 40,
    planned: PlannedPoint | None = None,
) -> list[ChartRow]:
    """Rows for each trial, sorted by batch size (trials of one size keep their order).

    The bar is the peak *reserved* bytes (what runs out); a trial that ran out of memory before
    its peak was known has no bar. A plan's micro-batch marks the trial at that size, or, where
    none was run there, gets a row of its own with the planner's predicted peak.
    """
    points: list[tuple[int, int | None, bool, str]] = [
        (t.batch_size, t.peak_reserved_bytes, t.ok, "" if t.ok else "  out of memory") for t in trials
    ]
    planned_size = None if planned is None else planned.batch_size
    if planned is not None and not any(size == planned_size and ok for size, _, ok, _ in points):
        points.append((planned.batch_size, planned.predicted_peak_bytes, True, " predicted"))
    points.sort(key=lambda point: point[0])
    label_width = max((len(str(size)) for size, *_ in points), default=1)
    rows = []
    marked = False
    for size, peak, ok, note in points:
        drawn = " " * width if peak is None else bar(peak / capacity_bytes, width)
        is_planned = ok and size == planned_size and not marked
        marked = marked or is_planned
        rows.append(
            ChartRow(
                batch_size=size,
                label=f"b={size:<{label_width}}",
                bar=drawn,
                value=(format_bytes(peak) if peak is not None else "—") + note,
                ok=ok,
                planned=is_planned,
            )
        )
    return rows


def memory_chart_lines(
    trials: Sequence[Trial],
    capacity_bytes: int,
    *,
    width: int = 40,
    budget_bytes: int | None = None,
    planned: PlannedPoint | None = None,
    heading: str = "Peak reserved memory by micro-batch",
) -> list[str]:
    """The chart as rich-markup lines: a title naming the capacity (and a plan's memory budget),
    then one line a row with the capacity drawn as `│` after the bar's full width (`heading`: the
    eval step's curve is drawn the same way). No lines where
    no trial measured a peak: there is no curve to draw."""
    if all(trial.peak_reserved_bytes is None for trial in trials):
        return []
    title = f"{heading} (│ = the device's {format_bytes(capacity_bytes)}"
    if budget_bytes is not None:
        title += f"; the plan's budget {format_bytes(budget_bytes)}"
    lines = [title + ")"]
    for row in memory_chart_rows(trials, capacity_bytes, width=width, planned=planned):
        colour = "cyan" if row.planned else "green" if row.ok else "red"
        mark = f"  {_PLANNED}" if row.planned else ""
        lines.append(f"  {row.label} [{colour}]{row.bar}[/]│ {row.value}{mark}")
    return lines
