"""`tuner estimate` end to end: the command, a child process that traces, the printed result."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tuner.cli import app
from tuner.units import format_bytes

TINY_GPT2 = {
    "model": {
        "family": "transformers",
        "config": {
            "model_type": "gpt2",
            "n_layer": 2,
            "n_embd": 32,
            "n_head": 2,
            "n_positions": 16,
            "vocab_size": 128,
            "bos_token_id": 0,
            "eos_token_id": 1,
        },
    },
    "inputs": {"kind": "tokens", "seq_len": 16},
}


def write_spec(tmp_path: Path) -> Path:
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps(TINY_GPT2))
    return path


def test_json_output_has_the_contract_fields(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["estimate", str(write_spec(tmp_path)), "--batch-size", "2", "--checkpointing", "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["batch_size"] == 2
    assert document["gradient_checkpointing"] is True
    assert document["peak_reserved_bytes"] >= document["peak_allocated_bytes"] > 0
    assert document["peak_phase"] in ("forward", "backward", "optimizer")
    assert document["seconds"] > 0
    assert sum(document["categories"].values()) == document["traced_peak_bytes"]


def test_table_output(tmp_path: Path) -> None:
    """The table shows the same estimate as the JSON (the trace is deterministic), not just labels."""
    spec = str(write_spec(tmp_path))
    table = CliRunner().invoke(app, ["estimate", spec, "-b", "1"])
    assert table.exit_code == 0, table.output
    document = json.loads(CliRunner().invoke(app, ["estimate", spec, "-b", "1", "--json"]).stdout)
    assert "gpt2, micro-batch 1" in table.stdout
    for label, key in (
        ("predicted peak allocated", "peak_allocated_bytes"),
        ("predicted peak reserved", "peak_reserved_bytes"),
        ("traced peak", "traced_peak_bytes"),
    ):
        row = next(line for line in table.stdout.splitlines() if label in line)
        assert format_bytes(document[key]) in row, (label, row)


def test_bad_spec_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"model": {"family": "transformers"}, "inputs": {"kind": "tokens", "seq_len": 8}}')
    result = CliRunner().invoke(app, ["estimate", str(path), "--batch-size", "2"])
    assert result.exit_code == 1
    assert "model.config is required" in result.output
