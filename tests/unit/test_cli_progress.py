"""The trial progress that `tuner plan` and `tuner probe` share, and their backend and device options."""

from __future__ import annotations

import pytest
import typer

from tuner.cli._options import BackendChoice, resolve_backend, target_device
from tuner.cli._progress import describe_trial, trial_progress
from tuner.results import ProbeResult
from tuner.search_types import Trial
from tuner.spec import DeviceSpec, parse_workload

MIB = 1 << 20
WORKLOAD = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 16, "num_layers": 1}},
        "inputs": {"kind": "features", "dim": 8, "num_classes": 2},
    }
)


def test_describe_trial_says_the_verdict_memory_and_time() -> None:
    assert describe_trial(Trial(48, True, 60 * MIB, 64 * MIB, seconds=3.14)) == (
        "batch 48 fits (reserved 64.00 MiB, 3.1 s)"
    )
    assert describe_trial(Trial(8, True, 60 * MIB, None)) == "batch 8 fits (reserved 60.00 MiB, 0.0 s)"
    assert describe_trial(Trial(96, False, None, None, seconds=0.5)) == (
        "batch 96 does not fit (out of memory, 0.5 s)"
    )
    assert describe_trial(Trial(96, False, None, None, error="timeout")) == (
        "batch 96 does not fit (timeout, 0.0 s)"
    )


def _result(trials: list[Trial]) -> ProbeResult:
    return ProbeResult(
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DeviceSpec(name="small GPU", total_memory_bytes=256 * MIB),
        backend="estimate",
        gradient_checkpointing=True,
        max_batch_size=4,
        trials=trials,
    )


@pytest.mark.parametrize("show", [True, False])
def test_progress_logs_each_trial_only_when_shown(show: bool, capsys: pytest.CaptureFixture[str]) -> None:
    trials = [Trial(4, True, MIB, 2 * MIB), Trial(8, False, None, None)]
    with trial_progress(WORKLOAD, "estimate", True, show=show) as bar:
        for trial in trials:
            bar.advance(trial)
        bar.done(_result(trials))
    captured = capsys.readouterr()
    assert captured.out == ""
    err = " ".join(captured.err.split())
    if show:
        assert "batch 4 fits (reserved 2.00 MiB" in err and "batch 8 does not fit" in err
        assert "Probed mlp (estimate, checkpointing on)" in err and "2 trials" in err
        assert "/32" not in err and "_progress.py" not in err
    else:
        assert err == ""


def test_backend_choice_and_target_device() -> None:
    assert resolve_backend(BackendChoice.cuda, 80 << 30) == "cuda"
    assert resolve_backend(None, 80 << 30) == "estimate"
    device = target_device(80 << 30, None)
    assert device == DeviceSpec(name="GPU with 80.00 GiB", total_memory_bytes=80 << 30)
    assert target_device(None, None) is None
    with pytest.raises(typer.Exit):
        target_device(None, "A100")



def test_describe_trial_says_why_the_guided_search_ran_it() -> None:
    from tuner.search_types import Move

    assert describe_trial(Trial(52, True, 60 * MIB, 64 * MIB, seconds=1.0, move=Move.PREDICT)) == (
        "batch 52 fits (reserved 64.00 MiB, 1.0 s): the memory line's prediction"
    )
    assert describe_trial(Trial(53, False, None, None, seconds=0.5, move=Move.ABOVE)) == (
        "batch 53 does not fit (out of memory, 0.5 s): just above the predicted top, to confirm it"
    )
