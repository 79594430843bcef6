"""examples/train_decoder.py runs end to end on a CPU (the run against a server is in
test_end_to_end.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_decoder.py"


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TUNER_SERVER", None)
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def losses_of(stdout: str) -> list[float]:
    return [
        float(x) for x in re.findall(r"^step \d+ loss ([\d.]+) grad_norm [\d.]+ tokens \d+$", stdout, re.M)
    ]


def test_trains_with_a_given_split_and_the_loss_falls() -> None:
    run = run_example("--micro-batch-size", "3", "--accumulation-steps", "2", "--steps", "6")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "window: micro-batches [3, 3]" in run.stdout
    losses = losses_of(run.stdout)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3


@pytest.mark.slow
def test_plans_locally_by_estimate_and_applies_the_plan() -> None:
    pytest.importorskip("probes.probe")
    run = run_example(
        "--local", "--effective-batch-size", "24", "--max-micro-batch-size", "8", "--steps", "2"
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "plan (local): micro-batch 8 × 3 accumulation steps" in run.stdout
    assert "window: micro-batches [8, 8, 8]" in run.stdout
    assert len(losses_of(run.stdout)) == 2
