"""A probe's trials on a terminal: a progress bar on stderr and one line per finished trial."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from tuner.cli._common import console, on_off

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from tuner.results import ProbeResult
    from tuner.search_types import Trial
    from tuner.spec import Backend, WorkloadSpec


class TrialProgress:
    """The bar of one probe; `advance` is the probe's `progress` callback."""

    def __init__(self, progress: Progress, task: TaskID, title: str) -> None:
        self._progress = progress
        self._task = task
        self._title = title

    def advance(self, trial: Trial) -> None:
        """One trial done: a step on the bar, and its batch size, memory and verdict above it."""
        self._progress.advance(self._task)
        if not self._progress.disable:
            # print, not log: a log line ends in the caller's file and line number.
            self._progress.console.print(describe_trial(trial), highlight=False)

    def done(self, result: ProbeResult) -> None:
        """The probe finished: the bar's total becomes the trials it took."""
        taken = len(result.trials)
        self._progress.update(self._task, total=taken, completed=taken, description=f"Probed {self._title}")


@contextmanager
def trial_progress(
    workload: WorkloadSpec, backend: Backend, checkpointing: bool, *, show: bool
) -> Iterator[TrialProgress]:
    """A bar of one probe's trials, drawn only when `show` (a terminal). How many trials a search
    takes is not known before it ends (usually 3–6, at most the search's trial budget): the bar pulses and
    counts until `done` gives it its total."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} trials"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
        transient=False,
    )
    title = f"{workload.describe()} ({backend}, checkpointing {on_off(checkpointing)})"
    with progress:
        yield TrialProgress(progress, progress.add_task(f"Probing {title}", total=None), title)


def describe_trial(trial: Trial) -> str:
    """`batch 48 fits (reserved 70.20 GiB, 3.1 s)` or `batch 96 does not fit (out of memory)`,
    then why the guided search ran it: `: the memory line's prediction`."""
    from tuner.search_types import MOVE_REASONS
    from tuner.units import format_bytes

    reason = f": {MOVE_REASONS.get(trial.move, trial.move)}" if trial.move else ""
    if not trial.ok:
        why = "out of memory" if trial.error in (None, "out_of_memory") else trial.error
        return f"batch {trial.batch_size} does not fit ({why}, {trial.seconds:.1f} s){reason}"
    peak = trial.peak_reserved_bytes or trial.peak_allocated_bytes
    return f"batch {trial.batch_size} fits (reserved {format_bytes(peak)}, {trial.seconds:.1f} s){reason}"
