"""`tuner plan --eval / --min-seq-len / --effective-tokens`: one-line errors naming the flag or
field, the table's rows and the eval curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.test_token_budget import probe_at, request
from tuner.cli import app
from tuner.cli.plan import print_plan
from tuner.plan_probes import ExtraProbes
from tuner.planner import make_plan

runner = CliRunner()
DECODER = {
    "model": {"family": "builtin", "name": "decoder", "kwargs": {"max_seq_len": 512}},
    "inputs": {"kind": "tokens", "seq_len": 512},
}
MLP = {"model": {"family": "builtin", "name": "mlp"}, "inputs": {"kind": "features", "dim": 32}}


@pytest.fixture(autouse=True)
def _no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_SERVER", raising=False)


def spec(tmp_path: Path, data: dict[str, object]) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("data", "args", "message"),
    [
        (
            DECODER,
            ["--min-seq-len", "600"],
            "--min-seq-len: inputs: min_seq_len (600) must not exceed seq_len (512)",
        ),
        (DECODER, ["--min-seq-len", "0"], "inputs.min_seq_len: Input should be greater than or equal to 1"),
        (MLP, ["--min-seq-len", "8"], "--min-seq-len needs token inputs"),
        (DECODER, ["--effective-tokens", "4096"], "effective_tokens needs workload.inputs.min_seq_len"),
        (
            DECODER,
            ["--min-seq-len", "64", "--effective-tokens", "100"],
            "effective_tokens (100) is not reachable",
        ),
    ],
)
def test_clear_errors(tmp_path: Path, data: dict[str, object], args: list[str], message: str) -> None:
    result = runner.invoke(
        app, ["plan", spec(tmp_path, data), "--effective-batch-size", "64", "--device-memory", "24GiB", *args]
    )
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())


def test_the_table_shows_the_eval_batch_the_token_budget_and_the_eval_curve(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    asked = request(min_seq_len=64, policy={"eval": True}, effective_tokens=100_000)
    evaluation = probe_at(512, step="eval")
    extras = ExtraProbes(eval=evaluation, lengths={n: {False: probe_at(n)} for n in (64, 288)})
    plan = make_plan(asked, {False: probe_at(512)}, extras)
    print_plan(plan, probe_at(512).trials, evaluation.trials)
    lines = capsys.readouterr().out.splitlines()
    out = " ".join(" ".join(lines).split())
    assert f"eval micro-batch │ {plan.eval_micro_batch_size}" in out
    assert (
        f"max tokens per micro-batch │ {plan.max_tokens_per_micro_batch} (lengths 64–512, set by 512)" in out
    )
    assert "largest batch by length │ 64: " in out
    assert "token accumulation │" in out
    title = next(i for i, text in enumerate(lines) if text.startswith("Eval: peak reserved memory"))
    assert any(
        "planned micro-batch" in row and f"b={plan.eval_micro_batch_size}" in row for row in lines[title:]
    )
