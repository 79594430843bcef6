"""Charts of a plan's probes as inline SVG, built on the server: no script, no network.

`memory_chart` draws peak allocated and peak reserved bytes against the micro-batch for each
checkpointing choice, the fitted memory line (dashed), the device's capacity, the plan's memory
budget (capacity less the margin) and the chosen micro-batch. `throughput_chart` draws measured
samples/s against the micro-batch. Pure functions of plain data (trials, memory lines, numbers)
that return SVG text; every piece of text they write is escaped, so the result may be embedded
in a page as is. Elements carry classes (`capacity-line`, `budget-line`, `chosen-line`,
`fitted-line`, `trial-point`) so that pages can be styled and checked.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from tuner.search_types import MemoryLine, Trial
from tuner.units import format_bytes

WIDTH = 600
PLOT_HEIGHT = 320
MARGIN_LEFT = 76
MARGIN_RIGHT = 20
MARGIN_TOP = 26
MARGIN_BOTTOM = 46
LEGEND_ROW = 22
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"

PALETTE = ("#1f6feb", "#8250df", "#0f766e", "#bf3989")
"""Series colours, in order (checkpointing off, on, then any further series)."""
CAPACITY_COLOUR = "#b91c1c"
BUDGET_COLOUR = "#b45309"
CHOSEN_COLOUR = "#15803d"
AXIS_COLOUR = "#57606a"
GRID_COLOUR = "#d0d7de"

_BINARY_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40))


@dataclass(frozen=True)
class ChartSeries:
    """The trials of one probe (one checkpointing choice) and what was fitted to them."""

    label: str
    """Shown in the legend and tooltips, e.g. `checkpointing off`."""
    trials: Sequence[Trial]
    memory_line: MemoryLine | None = None
    """Peak reserved bytes ≈ fixed + per_sample × b; drawn dashed."""


@dataclass(frozen=True)
class _Frame:
    """The plot area and the scales that map data onto it."""

    x_max: float
    y_max: float
    left: float = MARGIN_LEFT
    top: float = MARGIN_TOP
    width: float = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    height: float = PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(self, value: float) -> float:
        return self.left + self.width * value / self.x_max

    def y(self, value: float) -> float:
        return self.top + self.height * (1.0 - value / self.y_max)

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width


# ------------------------------------------------------------------------------------------ ticks


def nice_step(span: float, count: int = 5) -> float:
    """A round step (1, 2, 2.5 or 5 × 10ⁿ) that cuts `span` into about `count` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if factor * power >= raw:
            return factor * power
    return 10.0 * power


def nice_ticks(high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Ticks from 0 to the first round value at or above `high`."""
    step = nice_step(high, count)
    if integer:
        step = max(1.0, math.ceil(step))
    ticks = [0.0]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(ticks[-1] + step)
    return ticks


def byte_ticks(high: float, count: int = 5) -> tuple[list[float], str, int]:
    """Ticks in round numbers of one binary unit: (ticks in bytes, unit name, unit size)."""
    name, size = _BINARY_UNITS[0]
    for unit_name, unit_size in _BINARY_UNITS:
        if high >= unit_size:
            name, size = unit_name, unit_size
    ticks = nice_ticks(high / size, count)
    return [tick * size for tick in ticks], name, size


def _tick_label(value: float, unit: str = "") -> str:
    text = f"{value:.0f}" if value == round(value) else f"{value:.3g}"
    return f"{text} {unit}".strip()


# ---------------------------------------------------------------------------------------- helpers


def _num(value: float) -> str:
    return f"{value:.1f}"


def _text(x: float, y: float, content: str, *, anchor: str = "start", size: int = 13, **attrs: str) -> str:
    extra = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{escape(value)}"' for name, value in attrs.items()
    )
    return (
        f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" font-size="{size}"{extra}>'
        f"{escape(content)}</text>"
    )


def _line(x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line x1="{_num(x1)}" y1="{_num(y1)}" x2="{_num(x2)}" y2="{_num(y2)}"/>'


def _title(content: str) -> str:
    return f"<title>{escape(content)}</title>"


def _polyline(points: Sequence[tuple[float, float]], *, tooltip: str | None = None, **attrs: str) -> str:
    coords = " ".join(f"{_num(x)},{_num(y)}" for x, y in points)
    extra = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{escape(value)}"' for name, value in attrs.items()
    )
    if tooltip is None:
        return f'<polyline points="{coords}" fill="none"{extra}/>'
    return f'<polyline points="{coords}" fill="none"{extra}>{_title(tooltip)}</polyline>'


def _colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _open_svg(chart_id: str, title: str, description: str, height: float, css_class: str) -> list[str]:
    safe_id = escape(chart_id)
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {escape(css_class)}" id="{safe_id}" '
        f'viewBox="0 0 {WIDTH} {_num(height)}" role="img" '
        f'aria-labelledby="{safe_id}-title {safe_id}-desc" font-family="{escape(FONT)}">',
        f'<title id="{safe_id}-title">{escape(title)}</title>',
        f'<desc id="{safe_id}-desc">{escape(description)}</desc>',
        f'<clipPath id="{safe_id}-plot"><rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" '
        f'width="{WIDTH - MARGIN_LEFT - MARGIN_RIGHT}" height="{PLOT_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM}"/>'
        "</clipPath>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{_num(height)}" fill="#ffffff"/>',
    ]


def _axes(
    frame: _Frame,
    x_ticks: Sequence[float],
    y_ticks: Sequence[float],
    y_label: str,
    y_tick_text: Sequence[str],
) -> list[str]:
    parts = ['<g class="grid" stroke="' + GRID_COLOUR + '" stroke-width="1">']
    parts += [_line(frame.left, frame.y(t), frame.right, frame.y(t)) for t in y_ticks[1:]]
    parts.append("</g>")
    parts.append(f'<g class="axes" stroke="{AXIS_COLOUR}" stroke-width="1">')
    parts.append(_line(frame.left, frame.bottom, frame.right, frame.bottom))
    parts.append(_line(frame.left, frame.top, frame.left, frame.bottom))
    parts += [
        f'<line x1="{_num(frame.x(t))}" y1="{_num(frame.bottom)}" x2="{_num(frame.x(t))}" '
        f'y2="{_num(frame.bottom + 5)}"/>'
        for t in x_ticks
    ]
    parts += [_line(frame.left - 5, frame.y(t), frame.left, frame.y(t)) for t in y_ticks]
    parts.append("</g>")
    parts.append(f'<g class="tick-labels" fill="{AXIS_COLOUR}">')
    parts += [_text(frame.x(t), frame.bottom + 18, _tick_label(t), anchor="middle", size=12) for t in x_ticks]
    parts += [
        _text(frame.left - 8, frame.y(t) + 4, label, anchor="end", size=12)
        for t, label in zip(y_ticks, y_tick_text, strict=True)
    ]
    parts.append(_text(frame.left + frame.width / 2, frame.bottom + 38, "micro-batch size", anchor="middle"))
    parts.append(_text(frame.left, frame.top - 10, y_label, anchor="start"))
    parts.append("</g>")
    return parts


_HALO = {"stroke": "#ffffff", "stroke_width": "3", "paint_order": "stroke"}
"""Labels drawn over lines get a white outline, so that they stay readable."""


def _chosen_marker(
    frame: _Frame, batch_size: int, label: str, *, top: float, obstacles: Sequence[Segment] = ()
) -> list[str]:
    """The chosen micro-batch: a dotted line from the axis up to its predicted peak (`top`; the
    plot's top edge when none is known), labelled near its foot where no line runs."""
    x = frame.x(batch_size)
    toward_left = x + 4 > frame.right - 160
    side = (x - 4, "end") if toward_left else (x + 4, "start")
    other = (x + 4, "start") if toward_left else (x - 4, "end")
    candidates = [(side[0], y, side[1]) for y in (frame.bottom - 8, frame.bottom - 24)]
    candidates += [(other[0], y, other[1]) for y in (frame.bottom - 8, frame.bottom - 24)]
    label_x, label_y, anchor = _free_place(candidates, label, obstacles)
    return [
        f'<g class="chosen">'
        f'<line class="chosen-line" data-batch-size="{batch_size}" x1="{_num(x)}" y1="{_num(top)}" '
        f'x2="{_num(x)}" y2="{_num(frame.bottom)}" stroke="{CHOSEN_COLOUR}" stroke-width="2" '
        f'stroke-dasharray="2 3">{_title(label)}</line>',
        _text(
            label_x,
            label_y,
            label,
            anchor=anchor,
            size=12,
            fill=CHOSEN_COLOUR,
            class_="chosen-label",
            **_HALO,
        ),
        "</g>",
    ]


def _legend(rows: Sequence[Sequence[tuple[str, str]]], top: float) -> list[str]:
    """Rows of (swatch SVG, label) pairs under the plot."""
    parts = ['<g class="legend">']
    for row_index, row in enumerate(rows):
        y = top + row_index * LEGEND_ROW
        x = float(MARGIN_LEFT)
        for swatch, label in row:
            parts.append(f'<g transform="translate({_num(x)},{_num(y)})">{swatch}</g>')
            parts.append(_text(x + 22, y + 4, label, size=12, fill="#24292f"))
            x += 32 + 6.9 * len(label)
    parts.append("</g>")
    return parts


def _point(x: float, y: float, colour: str, shape: str, tooltip: str, css_class: str) -> str:
    if shape == "square":
        body = (
            f'<rect x="{_num(x - 4)}" y="{_num(y - 4)}" width="8" height="8" fill="{colour}" '
            f'stroke="#ffffff" stroke-width="1">'
        )
        return f'<g class="{css_class}">{body}{_title(tooltip)}</rect></g>'
    if shape == "cross":
        return (
            f'<g class="{css_class}" stroke="{colour}" stroke-width="2.5">{_title(tooltip)}'
            f'<line x1="{_num(x - 5)}" y1="{_num(y - 5)}" x2="{_num(x + 5)}" y2="{_num(y + 5)}"/>'
            f'<line x1="{_num(x - 5)}" y1="{_num(y + 5)}" x2="{_num(x + 5)}" y2="{_num(y - 5)}"/></g>'
        )
    return (
        f'<g class="{css_class}"><circle cx="{_num(x)}" cy="{_num(y)}" r="4" fill="#ffffff" '
        f'stroke="{colour}" stroke-width="2">{_title(tooltip)}</circle></g>'
    )


def _swatch(kind: str, colour: str) -> str:
    if kind == "line":
        return f'<line x1="0" y1="0" x2="18" y2="0" stroke="{colour}" stroke-width="2"/>'
    if kind == "dashed":
        return (
            f'<line x1="0" y1="0" x2="18" y2="0" stroke="{colour}" stroke-width="2" stroke-dasharray="5 3"/>'
        )
    if kind == "dotted":
        return (
            f'<line x1="0" y1="0" x2="18" y2="0" stroke="{colour}" stroke-width="2" stroke-dasharray="2 3"/>'
        )
    if kind == "square":
        return f'<rect x="5" y="-4" width="8" height="8" fill="{colour}"/>'
    if kind == "cross":
        return (
            f'<g stroke="{colour}" stroke-width="2.5"><line x1="4" y1="-5" x2="14" y2="5"/>'
            f'<line x1="4" y1="5" x2="14" y2="-5"/></g>'
        )
    return f'<circle cx="9" cy="0" r="4" fill="#ffffff" stroke="{colour}" stroke-width="2"/>'


# ------------------------------------------------------------------------------------ memory chart


def memory_chart(
    series: Sequence[ChartSeries],
    *,
    capacity_bytes: int,
    budget_bytes: int | None = None,
    chosen_batch_size: int | None = None,
    chosen_peak_bytes: int | None = None,
    title: str = "Peak memory against micro-batch size",
    chart_id: str = "memory-chart",
) -> str:
    """Peak allocated (circles) and reserved (squares) bytes of every passing trial against the
    micro-batch, per series; failed trials as crosses at the peak they measured (an estimate
    measures one past the capacity), or on the capacity line where the run stopped before its
    peak was known; the fitted memory line dashed; the capacity, the budget and the chosen
    micro-batch marked (its line rises to the predicted peak, and no cross sits on it). Labels
    are placed where no line of the plot runs through them."""
    frame, x_ticks, y_ticks, y_labels = _memory_frame(series, capacity_bytes, chosen_batch_size)
    legend_rows = _memory_legend(series)
    height = PLOT_HEIGHT + LEGEND_ROW * len(legend_rows) + 6
    description = _memory_description(series, capacity_bytes, budget_bytes, chosen_batch_size)
    parts = _open_svg(chart_id, title, description, height, "memory-chart")
    parts += _axes(frame, x_ticks, y_ticks, "peak memory", y_labels)

    chosen_span = None
    if chosen_batch_size is not None:
        top = frame.top if chosen_peak_bytes is None else frame.y(min(chosen_peak_bytes, frame.y_max))
        chosen_span = (frame.x(chosen_batch_size), top, frame.bottom)
    parts.append(f'<g clip-path="url(#{escape(chart_id)}-plot)">')
    for index, one in enumerate(series):
        parts += _memory_series(frame, one, _colour(index), capacity_bytes, chosen_span)
    parts.append("</g>")

    obstacles = _plot_lines(frame, series)
    parts += _capacity_and_budget(frame, capacity_bytes, budget_bytes, obstacles)
    if chosen_batch_size is not None and chosen_span is not None:
        parts += _chosen_micro_batch(frame, chosen_batch_size, chosen_peak_bytes, chosen_span[1], obstacles)
    parts += _legend(legend_rows, PLOT_HEIGHT + 4)
    parts.append("</svg>")
    return "\n".join(parts)


def _memory_frame(
    series: Sequence[ChartSeries], capacity_bytes: int, chosen_batch_size: int | None
) -> tuple[_Frame, list[float], list[float], list[str]]:
    """The plot's frame, wide enough for every trial and the chosen size, tall enough for every
    peak and the capacity; its ticks, and the y ticks' labels in one byte unit."""
    peaks = [
        float(p)
        for s in series
        for t in s.trials
        for p in (t.peak_allocated_bytes, t.peak_reserved_bytes)
        if p is not None
    ]
    sizes = [t.batch_size for s in series for t in s.trials]
    if chosen_batch_size is not None:
        sizes.append(chosen_batch_size)
    x_ticks = nice_ticks(max(sizes, default=1) * 1.05, integer=True)
    y_ticks, unit, unit_size = byte_ticks(max([float(capacity_bytes), *peaks]) * 1.06)
    frame = _Frame(x_max=x_ticks[-1], y_max=y_ticks[-1])
    return frame, x_ticks, y_ticks, [_tick_label(t / unit_size, unit) for t in y_ticks]


def _capacity_and_budget(
    frame: _Frame, capacity_bytes: int, budget_bytes: int | None, obstacles: Sequence[Segment]
) -> list[str]:
    """The device's capacity (solid) and the plan's budget (dashed, labelled below) across the plot."""
    parts = _horizontal(
        frame,
        capacity_bytes,
        "capacity-line",
        CAPACITY_COLOUR,
        f"device capacity {format_bytes(capacity_bytes)}",
        obstacles=obstacles,
    )
    if budget_bytes is not None:
        parts += _horizontal(
            frame,
            budget_bytes,
            "budget-line",
            BUDGET_COLOUR,
            f"budget {format_bytes(budget_bytes)}",
            dashed=True,
            label_below=True,
            obstacles=obstacles,
        )
    return parts


def _chosen_micro_batch(
    frame: _Frame, batch_size: int, peak_bytes: int | None, top: float, obstacles: Sequence[Segment]
) -> list[str]:
    """The chosen micro-batch's line up to its predicted peak, its label, and the peak's point."""
    parts = _chosen_marker(
        frame, batch_size, f"chosen micro-batch {batch_size}", top=top, obstacles=obstacles
    )
    if peak_bytes is not None:
        parts.append(
            _point(
                frame.x(batch_size),
                frame.y(min(peak_bytes, frame.y_max)),
                CHOSEN_COLOUR,
                "circle",
                f"predicted peak at {batch_size}: {format_bytes(peak_bytes)}",
                "chosen-point",
            )
        )
    return parts


def _memory_series(
    frame: _Frame,
    one: ChartSeries,
    colour: str,
    capacity_bytes: int,
    chosen_span: tuple[float, float, float] | None,
) -> list[str]:
    parts = [f'<g class="series" data-label="{escape(one.label)}">']
    if one.memory_line is not None:
        line = one.memory_line
        parts.append(
            _polyline(
                [
                    (frame.x(0), frame.y(line.at(0))),
                    (frame.x(frame.x_max), frame.y(line.at(int(frame.x_max)))),
                ],
                stroke=colour,
                stroke_width="1.5",
                stroke_dasharray="6 4",
                opacity="0.8",
                class_="fitted-line",
                tooltip=_fitted_tooltip(one),
            )
        )
    ordered = sorted((t for t in one.trials if t.ok), key=lambda t: t.batch_size)
    allocated = [
        (t.batch_size, t.peak_allocated_bytes) for t in ordered if t.peak_allocated_bytes is not None
    ]
    reserved = [(t.batch_size, t.peak_reserved_bytes) for t in ordered if t.peak_reserved_bytes is not None]
    allocated_line, allocated_points = _measured(
        frame,
        allocated,
        colour,
        "allocated",
        one.label,
        lambda p: f"peak allocated {format_bytes(p)}",
        line_width="1.5",
        line_dashes="2 3",
    )
    reserved_line, reserved_points = _measured(
        frame,
        reserved,
        colour,
        "reserved",
        one.label,
        lambda p: f"peak reserved {format_bytes(p)}",
        marker="square",
    )
    # Both lines first, so that no line covers the other quantity's points.
    parts += allocated_line + reserved_line + allocated_points + reserved_points
    for trial in one.trials:
        if not trial.ok:
            parts.append(_failed_point(frame, one.label, trial, colour, capacity_bytes, chosen_span))
    parts.append("</g>")
    return parts


CROSS_CLEARANCE = 9.0
"""Pixels between a failed trial's cross and the chosen micro-batch's line it would sit on."""


def _failed_point(
    frame: _Frame,
    label: str,
    trial: Trial,
    colour: str,
    capacity_bytes: int,
    chosen_span: tuple[float, float, float] | None,
) -> str:
    """A failed trial's cross: at its measured peak (reserved, else allocated), else on the
    capacity line (it ran out there); moved beside the chosen micro-batch's line rather than onto
    it, so that the chosen size never looks failed (the tooltip keeps the trial's own size)."""
    why = "out of memory" if trial.error in (None, "out_of_memory") else f"failed: {trial.error}"
    peak = trial.peak_reserved_bytes if trial.peak_reserved_bytes is not None else trial.peak_allocated_bytes
    where = f"peak {format_bytes(peak)}" if peak is not None else "no peak measured"
    x = frame.x(trial.batch_size)
    y = frame.y(min(float(peak if peak is not None else capacity_bytes), frame.y_max))
    if chosen_span is not None:
        # Beside the line, above its top too: a cross in line with it reads as the chosen size failing.
        line_x = chosen_span[0]
        if abs(x - line_x) < CROSS_CLEARANCE:
            x = line_x + CROSS_CLEARANCE if x >= line_x else line_x - CROSS_CLEARANCE
    tip = f"{label}: micro-batch {trial.batch_size}, {why} ({where})"
    measured = "measured" if peak is not None else "unmeasured"
    return _point(x, y, colour, "cross", tip, f"trial-point failed {measured}")


Segment = tuple[tuple[float, float], tuple[float, float]]


def _plot_lines(frame: _Frame, series: Sequence[ChartSeries]) -> list[Segment]:
    """The segments of every fitted and measured line, in pixels: what a label must not cover."""
    segments: list[Segment] = []
    for one in series:
        if one.memory_line is not None:
            line = one.memory_line
            segments.append(
                (
                    (frame.x(0), frame.y(line.at(0))),
                    (frame.x(frame.x_max), frame.y(line.at(int(frame.x_max)))),
                )
            )
        ordered = sorted((t for t in one.trials if t.ok), key=lambda t: t.batch_size)
        for quantity in ("peak_allocated_bytes", "peak_reserved_bytes"):
            points = [
                (frame.x(t.batch_size), frame.y(float(getattr(t, quantity))))
                for t in ordered
                if getattr(t, quantity) is not None
            ]
            segments += list(itertools.pairwise(points))
    return segments


def label_box(
    x: float, y: float, text: str, anchor: str, size: int = 12
) -> tuple[float, float, float, float]:
    """The box (left, top, right, bottom) a label of `size` px drawn at (x, y) covers, estimated
    from its length (the pages' sans-serif runs about 0.56 em a character)."""
    width = 0.56 * size * len(text)
    left = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
    return (left, y - size, left + width, y + 3)


def _crosses(box: tuple[float, float, float, float], segment: Segment) -> bool:
    """Whether a straight segment passes through a box (clipped to the box's columns)."""
    (x1, y1), (x2, y2) = sorted(segment)
    left, top, right, bottom = box
    if x2 < left or x1 > right:
        return False
    if x2 == x1:
        return not (max(y1, y2) < top or min(y1, y2) > bottom)
    slope = (y2 - y1) / (x2 - x1)
    ys = [y1 + slope * (min(max(x, x1), x2) - x1) for x in (left, right)]
    return not (max(ys) < top or min(ys) > bottom)


def _free_place(
    candidates: Sequence[tuple[float, float, str]], text: str, obstacles: Sequence[Segment]
) -> tuple[float, float, str]:
    """The first (x, y, anchor) where `text` covers no obstacle, else the first candidate."""
    for x, y, anchor in candidates:
        box = label_box(x, y, text, anchor)
        if not any(_crosses(box, segment) for segment in obstacles):
            return x, y, anchor
    return candidates[0]


def _measured(
    frame: _Frame,
    points: Sequence[tuple[int, float]],
    colour: str,
    quantity: str,
    label: str,
    value_text: Callable[[float], str],
    *,
    marker: str = "circle",
    line_width: str = "2",
    line_dashes: str | None = None,
) -> tuple[list[str], list[str]]:
    """One measured quantity of a series, `points` sorted by micro-batch: the line through them
    (class `<quantity>-line`; none for a single point) and a marker with a tooltip at each
    (`trial-point <quantity>`). Returned apart, so that a chart can draw lines under markers."""
    markers = []
    for b, v in points:
        tip = f"{label}: micro-batch {b}, {value_text(v)}"
        markers.append(_point(frame.x(b), frame.y(v), colour, marker, tip, f"trial-point {quantity}"))
    if len(points) < 2:
        return [], markers
    dashes = {"stroke_dasharray": line_dashes} if line_dashes is not None else {}
    line = _polyline(
        [(frame.x(b), frame.y(v)) for b, v in points],
        stroke=colour,
        stroke_width=line_width,
        **dashes,
        class_=f"{quantity}-line",
    )
    return [line], markers


def _fitted_tooltip(one: ChartSeries) -> str:
    assert one.memory_line is not None
    line = one.memory_line
    return (
        f"{one.label}: fitted line {format_bytes(line.fixed_bytes)} + "
        f"{format_bytes(line.per_sample_bytes)} per sample"
    )


def _horizontal(
    frame: _Frame,
    value: float,
    css_class: str,
    colour: str,
    label: str,
    *,
    dashed: bool = False,
    label_below: bool = False,
    obstacles: Sequence[Segment] = (),
) -> list[str]:
    y = frame.y(value)
    dash = ' stroke-dasharray="8 4"' if dashed else ""
    near, far = (y + 15, y - 6) if label_below else (y - 6, y + 15)
    # The right end first (out of the way of the data's start), then the left end, then places
    # along the line, on its own side first.
    along = [frame.left + 4 + frame.width * step / 8 for step in range(1, 7)]
    candidates = [(frame.right - 4, near, "end"), (frame.left + 4, near, "start")]
    candidates += [(x, near, "start") for x in along]
    candidates += [(frame.right - 4, far, "end"), (frame.left + 4, far, "start")]
    candidates += [(x, far, "start") for x in along]
    x, label_y, anchor = _free_place(
        [c for c in candidates if label_box(*c[:2], label, c[2])[2] <= frame.right], label, obstacles
    )
    return [
        f'<line class="{css_class}" data-bytes="{int(value)}" x1="{_num(frame.left)}" y1="{_num(y)}" '
        f'x2="{_num(frame.right)}" y2="{_num(y)}" stroke="{colour}" stroke-width="2"{dash}>'
        f"{_title(label)}</line>",
        _text(x, label_y, label, anchor=anchor, size=12, fill=colour, class_=f"{css_class}-label", **_HALO),
    ]


def _memory_legend(series: Sequence[ChartSeries]) -> list[list[tuple[str, str]]]:
    rows: list[list[tuple[str, str]]] = []
    for index, one in enumerate(series):
        colour = _colour(index)
        row = [
            (_swatch("square", colour), f"reserved ({one.label})"),
            (_swatch("circle", colour), "allocated"),
        ]
        if one.memory_line is not None:
            row.append((_swatch("dashed", colour), "fitted line"))
        if any(not t.ok for t in one.trials):
            row.append((_swatch("cross", colour), "failed"))
        rows.append(row)
    rows.append(
        [
            (_swatch("line", CAPACITY_COLOUR), "capacity"),
            (_swatch("dashed", BUDGET_COLOUR), "budget (capacity less margin)"),
            (_swatch("dotted", CHOSEN_COLOUR), "chosen"),
        ]
    )
    return rows


def _memory_description(
    series: Sequence[ChartSeries], capacity_bytes: int, budget_bytes: int | None, chosen: int | None
) -> str:
    parts = [f"Device capacity {format_bytes(capacity_bytes)}."]
    if budget_bytes is not None:
        parts.append(f"Memory budget {format_bytes(budget_bytes)}.")
    for one in series:
        passed = [t for t in one.trials if t.ok]
        failed = [t for t in one.trials if not t.ok]
        largest = max((t.batch_size for t in passed), default=None)
        parts.append(
            f"{one.label}: {len(one.trials)} trials, {len(passed)} passed"
            + (f" (largest {largest})" if largest is not None else "")
            + (f", {len(failed)} failed" if failed else "")
            + "."
        )
    if chosen is not None:
        parts.append(f"Chosen micro-batch {chosen}.")
    return " ".join(parts)


# -------------------------------------------------------------------------------- throughput chart


def throughput_chart(
    series: Sequence[ChartSeries],
    *,
    chosen_batch_size: int | None = None,
    chosen_samples_per_second: float | None = None,
    title: str = "Samples per second against micro-batch size",
    chart_id: str = "throughput-chart",
) -> str | None:
    """Measured samples/s of the passing trials against the micro-batch, per series; None when
    no trial measured it (the estimate backend does not)."""
    measured = [
        [
            (t.batch_size, t.samples_per_second)
            for t in one.trials
            if t.ok and t.samples_per_second is not None
        ]
        for one in series
    ]
    values = [float(v) for points in measured for _, v in points]
    if not values:
        return None
    sizes = [b for points in measured for b, _ in points]
    if chosen_batch_size is not None:
        sizes.append(chosen_batch_size)
    if chosen_samples_per_second is not None:
        values.append(chosen_samples_per_second)
    x_ticks = nice_ticks(max(sizes) * 1.05, integer=True)
    y_ticks = nice_ticks(max(values) * 1.08)
    frame = _Frame(x_max=x_ticks[-1], y_max=y_ticks[-1])
    rows = _throughput_legend(series, measured, chosen=chosen_batch_size is not None)
    height = PLOT_HEIGHT + LEGEND_ROW * len(rows) + 6
    description = " ".join(
        f"{one.label}: {len(points)} measured trials, best {max(v for _, v in points):.1f} samples/s."
        for one, points in zip(series, measured, strict=True)
        if points
    )
    parts = _open_svg(chart_id, title, description, height, "throughput-chart")
    parts += _axes(frame, x_ticks, y_ticks, "samples/s", [_tick_label(t) for t in y_ticks])
    for index, (one, points) in enumerate(zip(series, measured, strict=True)):
        if points:
            parts += _throughput_series(frame, one.label, sorted(points), _colour(index))
    if chosen_batch_size is not None:
        parts += _chosen_throughput(frame, chosen_batch_size, chosen_samples_per_second)
    parts += _legend(rows, PLOT_HEIGHT + 4)
    parts.append("</svg>")
    return "\n".join(parts)


def _throughput_legend(
    series: Sequence[ChartSeries], measured: Sequence[Sequence[tuple[int, float]]], *, chosen: bool
) -> list[list[tuple[str, str]]]:
    """One legend row: a swatch per series that measured anything, and the chosen marker's."""
    row = [
        (_swatch("circle", _colour(i)), f"samples/s ({one.label})")
        for i, one in enumerate(series)
        if measured[i]
    ]
    if chosen:
        row.append((_swatch("dotted", CHOSEN_COLOUR), "chosen"))
    return [row]


def _throughput_series(
    frame: _Frame, label: str, points: Sequence[tuple[int, float]], colour: str
) -> list[str]:
    """One series' measured samples/s: the line through them and a marker on each."""
    line, markers = _measured(frame, points, colour, "throughput", label, lambda v: f"{v:.1f} samples/s")
    return [f'<g class="series" data-label="{escape(label)}">', *line, *markers, "</g>"]


def _chosen_throughput(frame: _Frame, batch_size: int, samples_per_second: float | None) -> list[str]:
    """The chosen micro-batch's line, and the samples/s predicted there."""
    parts = _chosen_marker(frame, batch_size, f"chosen micro-batch {batch_size}", top=frame.top)
    if samples_per_second is not None:
        tip = f"predicted {samples_per_second:.1f} samples/s at {batch_size}"
        parts.append(
            _point(
                frame.x(batch_size), frame.y(samples_per_second), CHOSEN_COLOUR, "circle", tip, "chosen-point"
            )
        )
    return parts
