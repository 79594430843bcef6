"""The probe's tools around the search: `tuner probe`, the strategy benchmark, the GPU script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO
from tuner.cli import app

TINY_CNN = {
    "model": {
        "family": "builtin",
        "name": "cnn",
        "kwargs": {"base_channels": 8, "num_stages": 2, "blocks_per_stage": 1},
    },
    "inputs": {"kind": "image", "channels": 3, "height": 32, "width": 32, "num_classes": 10},
    "precision": "fp32",
}


def _bench_module() -> object:
    spec = importlib.util.spec_from_file_location("probe_strategies", REPO / "bench" / "probe_strategies.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_strategies"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_synthetic_bench_has_a_row_per_device_and_strategy() -> None:
    bench = _bench_module()
    rows = bench.synthetic_rows()  # type: ignore[attr-defined]
    text = bench.markdown(rows, "test")  # type: ignore[attr-defined]
    guided = [r for r in rows if r.strategy == "guided (prior +5%)"]
    doubling = {r.workload: r for r in rows if r.strategy == "doubling"}
    assert len(rows) == 4 * len(doubling) and text.count("\n| ") == len(rows) + 2  # header and rule
    for row in guided:  # guided is exact where the maximum is well defined, and never slower
        assert row.largest == int(row.verified.split("true ")[1].rstrip(")"))
        assert row.seconds <= doubling[row.workload].seconds


@pytest.mark.slow
def test_probe_command_prints_the_probe_result_as_json(tmp_path: Path) -> None:
    spec_file = tmp_path / "cnn.json"
    spec_file.write_text(json.dumps(TINY_CNN))
    result = CliRunner().invoke(app, ["probe", str(spec_file), "--device-memory", "2GiB", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["backend"] == "estimate" and document["gradient_checkpointing"] is False
    assert document["device"]["total_memory_bytes"] == 2 << 30
    assert document["max_batch_size"] > 0
    passing = [t for t in document["trials"] if t["ok"]]
    assert max(t["batch_size"] for t in passing) == document["max_batch_size"]
    assert {"batch_size", "ok", "peak_allocated_bytes", "peak_reserved_bytes", "seconds"} <= set(passing[0])


@pytest.mark.slow
def test_probe_command_draws_the_memory_curve_under_its_table(tmp_path: Path) -> None:
    spec_file = tmp_path / "cnn.json"
    spec_file.write_text(json.dumps(TINY_CNN))
    result = CliRunner().invoke(app, ["probe", str(spec_file), "--device-memory", "2GiB"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Peak reserved memory by micro-batch"))
    assert "2.00 GiB" in lines[start]
    bars = [line for line in lines[start + 1 :] if line.lstrip().startswith("b=")]
    sizes = [int(line.split()[0].removeprefix("b=")) for line in bars]
    assert len(bars) >= 2 and sizes == sorted(sizes)
    assert len({line.index("│") for line in bars}) == 1  # one capacity column
    assert any("out of memory" in line for line in bars) and "█" in bars[-1]


def test_probe_command_refuses_a_device_name_without_memory(tmp_path: Path) -> None:
    spec_file = tmp_path / "cnn.json"
    spec_file.write_text(json.dumps(TINY_CNN))
    result = CliRunner().invoke(
        app, ["probe", str(spec_file), "--backend", "estimate", "--device-name", "A100"]
    )
    assert result.exit_code == 1
    assert "--device-name needs --device-memory" in result.output


@pytest.mark.slow
def test_gpu_check_dry_run_imports_everything(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tests/gpu/test_cuda_probe.py" in (tmp_path / "dry-pytest.log").read_text()
    assert "| gpt2-like linear |" in (tmp_path / "probe_strategies_synthetic.md").read_text()


def test_probe_refuses_a_bad_alloc_conf_in_one_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "cnn.json"
    spec_file.write_text(json.dumps(TINY_CNN))
    result = CliRunner().invoke(
        app, ["probe", str(spec_file), "--device-memory", "2GiB", "--alloc-conf", "expandable:True"]
    )
    assert result.exit_code != 0
    assert "--alloc-conf: unknown option 'expandable'" in result.output
    assert "Traceback" not in result.output
