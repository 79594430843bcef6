"""What a person sees from the CLI: a bad `--device-memory` is one line naming the flag and the
forms it takes (no traceback), trial lines carry no source location, the bar does not claim the
trial budget as the trials to come, and a job's progress reads as trials."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import tuner.cli._progress as progress_module
from tuner.cli import app
from tuner.cli._progress import trial_progress
from tuner.client import _describe_progress
from tuner.results import ProbeResult
from tuner.search_types import Trial
from tuner.spec import DeviceSpec, parse_workload

MLP = {
    "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 8}},
    "inputs": {"kind": "features", "dim": 4},
    "precision": "fp32",
}


@pytest.fixture
def spec_file(tmp_path: Path) -> str:
    path = tmp_path / "mlp.json"
    path.write_text(json.dumps(MLP))
    return str(path)


@pytest.mark.parametrize("memory", ["24", "0", "lots", "4096TiB"])
@pytest.mark.parametrize("command", [["plan", "--effective-batch-size", "8", "--local"], ["probe"]])
def test_a_bad_device_memory_is_one_line_naming_the_flag(
    spec_file: str, command: list[str], memory: str
) -> None:
    result = CliRunner().invoke(app, [command[0], spec_file, *command[1:], "--device-memory", memory])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: --device-memory '{memory}' ")
    assert "80GiB" in lines[0] and "Traceback" not in result.output
    if memory in ("24", "0"):
        assert "a bare number counts bytes" in lines[0]


def test_trial_lines_carry_no_source_location_and_the_bar_no_trial_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "console", Console(file=screen, force_terminal=True, width=160))
    workload = parse_workload(MLP)
    trials = [
        Trial(batch_size=1, ok=True, peak_allocated_bytes=1 << 20, peak_reserved_bytes=2 << 20, seconds=0.5),
        Trial(batch_size=64, ok=False, seconds=0.7),
    ]
    with trial_progress(workload, "estimate", False, show=True) as bar:
        for trial in trials:
            bar.advance(trial)
        bar.done(
            ProbeResult(
                fingerprint=workload.fingerprint(),
                workload=workload,
                device=DeviceSpec(name="Test GPU", total_memory_bytes=1 << 30),
                backend="estimate",
                gradient_checkpointing=False,
                max_batch_size=1,
                trials=trials,
            )
        )
    drawn = screen.getvalue()
    assert "batch 1 fits (reserved 2.00 MiB, 0.5 s)" in drawn
    assert "batch 64 does not fit (out of memory, 0.7 s)" in drawn
    assert "_progress.py" not in drawn and ".py:" not in drawn
    assert "/32" not in drawn and "2 trials" in drawn


def test_a_jobs_trial_report_reads_as_trials() -> None:
    report = {"gradient_checkpointing": True, "trials": 3, "last_batch_size": 48, "ok": False}
    assert _describe_progress(report) == (None, "checkpointing on: 3 trials, last b=48 does not fit")
    assert _describe_progress({"gradient_checkpointing": False, "trials": 0}) == (
        None,
        "checkpointing off: 0 trials",
    )
    assert _describe_progress(0.5) == (0.5, "")
