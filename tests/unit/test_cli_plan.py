"""`tuner plan`: argument checks, the table, and a whole local plan with the estimate backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tuner.cli import app
from tuner.cli.plan import print_plan
from tuner.planner import make_plan
from tuner.results import Plan, ProbeResult, WorkloadFacts
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, parse_plan_request

GIB = 1 << 30
TINY_MLP = {
    "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 2}},
    "inputs": {"kind": "features", "dim": 32, "num_classes": 10},
    "precision": "fp32",
}
runner = CliRunner()


@pytest.fixture
def spec_file(tmp_path: Path) -> str:
    path = tmp_path / "mlp.json"
    path.write_text(json.dumps(TINY_MLP))
    return str(path)


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_SERVER", raising=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "estimate"], "needs the target device's memory: pass --device-memory"),
        (["--local", "--server", "http://127.0.0.1:9"], "either --local or --server"),
        # A smaller card is emulated on this machine's GPU, and this machine has none.
        (["--backend", "cuda", "--device-memory", "80GiB"], "The cuda backend needs a CUDA GPU"),
        (["--device-memory", "80GiB", "--ramp-start", "8"], "needs both --ramp-start and --ramp-steps"),
        (["--device-memory", "80GiB", "--margin", "0.9"], "memory_margin"),
        (["--device-memory", "lots"], "is not a size"),
    ],
)
def test_clear_errors(spec_file: str, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plan", spec_file, "--effective-batch-size", "64", *args])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_missing_spec_file(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["plan", str(tmp_path / "none.json"), "--effective-batch-size", "8", "--device-memory", "1GiB"]
    )
    assert result.exit_code == 1 and "Cannot read spec file" in result.output


def _example_plan() -> Plan:
    request = parse_plan_request(
        {
            "workload": TINY_MLP,
            "effective_batch_size": 512,
            "backend": "estimate",
            "policy": {"allow_uneven_micro_batches": True},
        }
    )
    device = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=40 * GIB)
    line = MemoryLine(fixed_bytes=2 * GIB, per_sample_bytes=0.7 * GIB)
    probe = ProbeResult(
        fingerprint=request.workload.fingerprint(),
        workload=request.workload,
        device=device,
        backend="estimate",
        gradient_checkpointing=False,
        max_batch_size=52,
        trials=[Trial(b, True, int(line.at(b)), int(line.at(b))) for b in (26, 52)],
        memory_line=line,
        facts=WorkloadFacts(parameter_count=10_000),
    )
    return make_plan(request, {False: probe})


def test_table_shows_the_plan(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    plan = _example_plan()
    print_plan(plan)
    out = " ".join(capsys.readouterr().out.split())
    assert "6 micro-batches of 47 and 5 of 46 (uneven)" in out
    assert "accumulation steps │ 11" in out
    assert "largest micro-batch │ off: 52" in out
    assert "hint: Micro-batches differ in size" in out


def test_table_draws_the_trials_and_the_planned_micro_batch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    plan = _example_plan()
    line = MemoryLine(fixed_bytes=2 * GIB, per_sample_bytes=0.7 * GIB)
    trials = [Trial(b, True, int(line.at(b)), int(line.at(b))) for b in (26, 52)] + [Trial(53, False)]
    print_plan(plan, trials)
    lines = capsys.readouterr().out.splitlines()
    title = next(i for i, text in enumerate(lines) if text.startswith("Peak reserved memory by micro-batch"))
    assert "40.00 GiB" in lines[title] and "budget 38.00 GiB" in lines[title]
    rows = lines[title + 1 : title + 5]
    assert [row.split()[0] for row in rows] == ["b=26", "b=47", "b=52", "b=53"]
    assert "predicted" in rows[1] and "planned micro-batch" in rows[1]  # 47 was never run
    assert "out of memory" in rows[3]


@pytest.mark.slow
def test_local_estimate_plan_end_to_end(spec_file: str) -> None:
    """Both checkpointing choices estimated in child processes (fake tensors), then planned."""
    result = runner.invoke(
        app,
        [
            "plan",
            spec_file,
            "--effective-batch-size",
            "96",
            "--world-size",
            "2",
            "--local",
            "--backend",
            "estimate",
            "--device-memory",
            "2GiB",
            "--device-name",
            "small GPU",
            "--max-micro-batch-size",
            "40",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(result.stdout)
    assert plan.backend == "estimate" and plan.device.name == "small GPU"
    assert plan.device.total_memory_bytes == 2 * GIB
    # 48 per rank, at most 40 per micro-batch: 2 × 24 is the fewest steps, and only because of the cap.
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.gradient_checkpointing) == (24, 2, False)
    assert set(plan.max_micro_batch_size) == {"off", "on"}
    assert all(0 < largest <= 40 for largest in plan.max_micro_batch_size.values())
    assert plan.predicted_samples_per_second is None
    assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes <= plan.memory_budget_bytes
    assert any("max_micro_batch_size" in warning for warning in plan.warnings)
    assert any("Estimated without a GPU" in hint for hint in plan.hints)
