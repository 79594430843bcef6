"""`api.charts`: the SVG is well-formed XML, marks what it should, and escapes every text."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from api.charts import ChartSeries, byte_ticks, memory_chart, nice_ticks, throughput_chart
from tuner.search_types import MemoryLine, Trial

SVG = "{http://www.w3.org/2000/svg}"
GIB = 1 << 30
CAPACITY = 80 * GIB
BUDGET = 76 * GIB


def _trials(per_sample: float, largest: int, *, speed: float | None = None) -> list[Trial]:
    line = MemoryLine(fixed_bytes=4 * GIB, per_sample_bytes=per_sample)
    sizes = [largest // 4, largest // 2, largest, largest + 1]
    return [
        Trial(
            batch_size=b,
            ok=b <= largest,
            peak_allocated_bytes=int(line.at(b) * 0.9) if b <= largest else None,
            peak_reserved_bytes=int(line.at(b)) if b <= largest else None,
            samples_per_second=speed * b / (b + 8) if speed is not None and b <= largest else None,
            error=None if b <= largest else "out_of_memory",
        )
        for b in sizes
    ]


def _series(*, speed: float | None = None) -> list[ChartSeries]:
    return [
        ChartSeries(
            "checkpointing off",
            _trials(1.5 * GIB, 48, speed=speed),
            MemoryLine(fixed_bytes=4 * GIB, per_sample_bytes=1.5 * GIB),
        ),
        ChartSeries(
            "checkpointing on",
            _trials(0.6 * GIB, 120, speed=None if speed is None else speed * 0.8),
            MemoryLine(fixed_bytes=4 * GIB, per_sample_bytes=0.6 * GIB),
        ),
    ]


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def _by_class(root: ET.Element, css_class: str) -> list[ET.Element]:
    return [el for el in root.iter() if css_class in (el.get("class") or "").split()]


def test_memory_chart_is_valid_svg_with_an_accessible_name() -> None:
    root = _parse(memory_chart(_series(), capacity_bytes=CAPACITY, budget_bytes=BUDGET, chosen_batch_size=32))
    assert root.get("role") == "img"
    title_id, desc_id = (root.get("aria-labelledby") or "").split()
    ids = {el.get("id"): el for el in root.iter() if el.get("id")}
    assert ids[title_id].tag == f"{SVG}title" and "Peak memory" in (ids[title_id].text or "")
    assert ids[desc_id].tag == f"{SVG}desc"
    assert "Device capacity 80.00 GiB" in (ids[desc_id].text or "")
    assert "checkpointing off: 4 trials, 3 passed (largest 48), 1 failed." in (ids[desc_id].text or "")


def test_capacity_budget_and_chosen_lines_sit_where_their_values_are() -> None:
    root = _parse(
        memory_chart(
            _series(),
            capacity_bytes=CAPACITY,
            budget_bytes=BUDGET,
            chosen_batch_size=32,
            chosen_peak_bytes=int(4 * GIB + 32 * 1.5 * GIB),
        )
    )
    (capacity,) = _by_class(root, "capacity-line")
    (budget,) = _by_class(root, "budget-line")
    (chosen,) = _by_class(root, "chosen-line")
    assert capacity.get("data-bytes") == str(CAPACITY)
    assert budget.get("data-bytes") == str(BUDGET)
    assert chosen.get("data-batch-size") == "32"
    # Horizontal lines; more bytes are higher up (smaller y); the budget is dashed.
    assert capacity.get("y1") == capacity.get("y2") and budget.get("y1") == budget.get("y2")
    assert float(capacity.get("y1", "0")) < float(budget.get("y1", "0"))
    assert budget.get("stroke-dasharray") and not capacity.get("stroke-dasharray")
    # The predicted peak sits on the chosen line.
    (point,) = _by_class(root, "chosen-point")
    (circle,) = point.iter(f"{SVG}circle")
    assert circle.get("cx") == chosen.get("x1")


def test_every_trial_is_drawn_and_the_fitted_line_is_dashed() -> None:
    series = _series()
    root = _parse(memory_chart(series, capacity_bytes=CAPACITY))
    passing = sum(t.ok for s in series for t in s.trials)
    failing = sum(not t.ok for s in series for t in s.trials)
    assert len(_by_class(root, "reserved")) == passing
    assert len(_by_class(root, "allocated")) == passing
    assert len(_by_class(root, "failed")) == failing
    fitted = _by_class(root, "fitted-line")
    assert len(fitted) == 2 and all(line.get("stroke-dasharray") for line in fitted)
    # A point higher in bytes is drawn higher: reserved above allocated at the same size.
    reserved_y = [float(r.get("y", "0")) for g in _by_class(root, "reserved") for r in g.iter(f"{SVG}rect")]
    allocated_y = [
        float(c.get("cy", "0")) for g in _by_class(root, "allocated") for c in g.iter(f"{SVG}circle")
    ]
    assert all(r + 4 < a for r, a in zip(reserved_y, allocated_y, strict=True))


def test_without_a_memory_line_no_fitted_line_is_drawn() -> None:
    series = [ChartSeries("checkpointing off", _trials(GIB, 40))]
    root = _parse(memory_chart(series, capacity_bytes=CAPACITY))
    assert _by_class(root, "fitted-line") == []
    assert _by_class(root, "budget-line") == [] and _by_class(root, "chosen-line") == []


def test_text_is_escaped() -> None:
    hostile = "<script>alert(1)</script> & \"quotes\" 'single'"
    series = [ChartSeries(f"</text><script>x()</script>{hostile}", _trials(GIB, 40), None)]
    svg = memory_chart(series, capacity_bytes=CAPACITY, title=hostile, chart_id='a"b<c')
    assert "<script" not in svg
    root = _parse(svg)
    assert not [el for el in root.iter() if el.tag.endswith("script")]
    assert root.find(f"{SVG}title") is not None
    assert root.find(f"{SVG}title").text == hostile  # type: ignore[union-attr]
    labels = [el.get("data-label") for el in _by_class(root, "series")]
    assert labels == [series[0].label]


def test_throughput_chart_only_where_measured() -> None:
    assert throughput_chart(_series(speed=None), chosen_batch_size=32) is None
    svg = throughput_chart(_series(speed=400.0), chosen_batch_size=32, chosen_samples_per_second=320.0)
    assert svg is not None
    root = _parse(svg)
    measured = sum(t.samples_per_second is not None for s in _series(speed=400.0) for t in s.trials)
    assert len(_by_class(root, "throughput")) == measured == 6
    assert len(_by_class(root, "chosen-line")) == 1


def test_a_probe_without_trials_still_draws_the_frame() -> None:
    root = _parse(
        memory_chart([ChartSeries("checkpointing off", [])], capacity_bytes=CAPACITY, chosen_batch_size=1)
    )
    assert len(_by_class(root, "capacity-line")) == 1 and _by_class(root, "trial-point") == []


@pytest.mark.parametrize(
    ("high", "unit", "top"),
    [(85_017_493_504 * 1.06, "GiB", 100 * GIB), (3.5 * GIB, "GiB", 4 * GIB), (700 << 20, "MiB", 800 << 20)],
)
def test_byte_ticks_are_round_numbers_of_one_unit(high: float, unit: str, top: int) -> None:
    ticks, name, _ = byte_ticks(high)
    assert name == unit and ticks[0] == 0 and ticks[-1] == top and ticks[-1] >= high
    steps = {round(b - a) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and 3 <= len(ticks) - 1 <= 10


def test_integer_ticks_never_step_by_less_than_one() -> None:
    assert nice_ticks(2.1, integer=True) == [0.0, 1.0, 2.0, 3.0]
    assert nice_ticks(130, integer=True)[-1] >= 130


def _cross_centre(group: ET.Element) -> tuple[float, float]:
    line = next(group.iter(f"{SVG}line"))
    x = (float(line.get("x1", "0")) + float(line.get("x2", "0"))) / 2
    y = (float(line.get("y1", "0")) + float(line.get("y2", "0"))) / 2
    return x, y


def _y_of(root: ET.Element, capacity: ET.Element, value: float) -> float:
    """The y of `value` bytes, from the capacity line's y (the y axis starts at 0 at the bottom)."""
    bottom = max(float(el.get("y2", "0")) for el in _by_class(root, "chosen-line"))
    top_y = float(capacity.get("y1", "0"))
    return bottom - (bottom - top_y) * value / CAPACITY


def test_a_failed_trial_sits_at_its_measured_peak_or_on_the_capacity_line() -> None:
    measured = Trial(batch_size=60, ok=False, peak_reserved_bytes=88 * GIB, peak_allocated_bytes=85 * GIB)
    unmeasured = Trial(batch_size=70, ok=False, error="out_of_memory")
    passing = Trial(batch_size=30, ok=True, peak_reserved_bytes=40 * GIB, peak_allocated_bytes=36 * GIB)
    root = _parse(
        memory_chart(
            [ChartSeries("checkpointing off", [passing, measured, unmeasured])],
            capacity_bytes=CAPACITY,
            chosen_batch_size=30,
        )
    )
    (capacity,) = _by_class(root, "capacity-line")
    crosses = {
        ("measured" in (g.get("class") or "").split()): _cross_centre(g) for g in _by_class(root, "failed")
    }
    assert crosses[True][1] == pytest.approx(_y_of(root, capacity, 88 * GIB), abs=0.2)
    assert crosses[False][1] == pytest.approx(float(capacity.get("y1", "0")), abs=0.2)


def test_no_failed_trial_is_drawn_on_the_chosen_micro_batch_line() -> None:
    # Checkpointing off ran out at 100; checkpointing on fits 100 and is chosen there.
    off = [
        Trial(batch_size=50, ok=True, peak_reserved_bytes=60 * GIB, peak_allocated_bytes=55 * GIB),
        Trial(batch_size=100, ok=False, error="out_of_memory"),
        Trial(batch_size=100, ok=False, peak_reserved_bytes=79 * GIB),  # measured, under the top
    ]
    on = [Trial(batch_size=100, ok=True, peak_reserved_bytes=70 * GIB, peak_allocated_bytes=64 * GIB)]
    root = _parse(
        memory_chart(
            [ChartSeries("checkpointing off", off), ChartSeries("checkpointing on", on)],
            capacity_bytes=CAPACITY,
            chosen_batch_size=100,
            chosen_peak_bytes=70 * GIB,
        )
    )
    (chosen,) = _by_class(root, "chosen-line")
    x, top = float(chosen.get("x1", "0")), float(chosen.get("y1", "0"))
    (capacity,) = _by_class(root, "capacity-line")
    # The chosen line rises from the axis to the predicted peak, no higher.
    assert top == pytest.approx(_y_of(root, capacity, 70 * GIB), abs=0.2)
    for group in _by_class(root, "failed"):
        cross_x, _ = _cross_centre(group)
        assert abs(cross_x - x) >= 9 - 0.1
        assert "micro-batch 100" in "".join(group.itertext())  # the tooltip keeps the trial's size


def test_the_line_labels_cover_no_plotted_line() -> None:
    from api.charts import _crosses, label_box  # the chart's own estimate of a label's box

    svg = memory_chart(_series(), capacity_bytes=CAPACITY, budget_bytes=BUDGET, chosen_batch_size=24)
    root = _parse(svg)
    segments = []
    for css_class in ("fitted-line", "reserved-line", "allocated-line"):
        for polyline in _by_class(root, css_class):
            points = [tuple(map(float, p.split(","))) for p in (polyline.get("points") or "").split()]
            segments += list(itertools.pairwise(points))
    assert len(segments) > 4
    for css_class in ("capacity-line-label", "budget-line-label", "chosen-label"):
        (label,) = _by_class(root, css_class)
        x, y = float(label.get("x", "0")), float(label.get("y", "0"))
        box = label_box(x, y, label.text or "", label.get("text-anchor", "start"))
        assert not any(_crosses(box, segment) for segment in segments), css_class  # type: ignore[arg-type]
