"""The terminal chart of peak memory against micro-batch."""

from __future__ import annotations

import pytest

from tuner.cli._memory_chart import PlannedPoint, bar, memory_chart_lines, memory_chart_rows
from tuner.search_types import Trial

GIB = 1 << 30


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.0, "          "),
        (0.5, "█████     "),
        (0.0125, "▏         "),  # one eighth of a cell
        (0.55, "█████▌    "),
        (1.0, "██████████"),
        (1.3, "█████████▶"),  # past the capacity
    ],
)
def test_bars_fill_eighths_of_cells_and_mark_overflow(fraction: float, expected: str) -> None:
    assert bar(fraction, 10) == expected


def test_rows_follow_the_batch_size_and_mark_what_ran_out() -> None:
    trials = [
        Trial(batch_size=64, ok=True, peak_reserved_bytes=40 * GIB),
        Trial(batch_size=1, ok=True, peak_reserved_bytes=2 * GIB),
        Trial(batch_size=128, ok=False),  # a real OOM: no peak known
        Trial(batch_size=100, ok=False, peak_reserved_bytes=81 * GIB),
    ]
    rows = memory_chart_rows(trials, 80 * GIB, width=20)
    assert [row.label for row in rows] == ["b=1  ", "b=64 ", "b=100", "b=128"]
    assert [row.ok for row in rows] == [True, True, False, False]
    assert rows[0].bar == "▌".ljust(20)  # 2/80 of 20 cells = half a cell
    assert rows[1].bar == "█" * 10 + " " * 10
    assert rows[2].bar.endswith("▶") and rows[2].value == "81.00 GiB  out of memory"
    assert rows[3].bar == " " * 20 and rows[3].value == "—  out of memory"
    assert {len(row.bar) for row in rows} == {20}  # the capacity line stands in one column


def test_lines_name_the_capacity_and_colour_the_verdicts() -> None:
    lines = memory_chart_lines(
        [Trial(batch_size=8, ok=True, peak_reserved_bytes=GIB), Trial(batch_size=9, ok=False)], 4 * GIB
    )
    assert "4.00 GiB" in lines[0]
    assert "[green]" in lines[1] and "1.00 GiB" in lines[1]
    assert "[red]" in lines[2] and "out of memory" in lines[2]


def test_a_planned_size_that_was_run_marks_that_trial() -> None:
    trials = [Trial(batch_size=8, ok=True, peak_reserved_bytes=GIB), Trial(batch_size=16, ok=True)]
    rows = memory_chart_rows(trials, 4 * GIB, planned=PlannedPoint(8, GIB))
    assert [(row.batch_size, row.planned) for row in rows] == [(8, True), (16, False)]
    assert "predicted" not in rows[0].value


def test_a_planned_size_that_was_not_run_gets_its_predicted_row() -> None:
    trials = [Trial(batch_size=8, ok=True, peak_reserved_bytes=GIB), Trial(batch_size=16, ok=False)]
    lines = memory_chart_lines(trials, 4 * GIB, budget_bytes=3 * GIB, planned=PlannedPoint(12, 2 * GIB))
    assert "budget 3.00 GiB" in lines[0]
    assert lines[2].split()[0] == "b=12"
    assert "2.00 GiB predicted" in lines[2] and "◀ planned micro-batch" in lines[2] and "[cyan]" in lines[2]


def test_nothing_is_drawn_where_no_trial_measured_a_peak() -> None:
    trials = [Trial(batch_size=8, ok=False), Trial(batch_size=4, ok=False)]
    assert memory_chart_lines(trials, 4 * GIB, planned=PlannedPoint(2, GIB)) == []
    assert memory_chart_lines([], 4 * GIB) == []
