"""The plan page of a plan with an eval micro-batch and a token budget, served by a real uvicorn
server on its own SQLite database: the summary names both, the memory chart draws the eval step's
curve beside the train step's, and the eval probe's trials are listed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from html import unescape
from pathlib import Path

import httpx

from storage import repository
from storage.db import ensure_schema, make_engine
from tests.servers import running_api_server
from tests.unit.test_token_budget import probe_at, request
from tuner.plan_probes import ExtraProbes
from tuner.planner import make_plan
from tuner.results import ProbeResult


def test_the_page_shows_the_eval_batch_the_token_budget_and_the_eval_curve(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'tuner.db'}"
    engine = make_engine(database_url)
    ensure_schema(engine)

    def stored(probe: ProbeResult) -> ProbeResult:
        return repository.get_probe(engine, probe_id=repository.save_probe(engine, result=probe))

    asked = request(min_seq_len=64, policy={"eval": True})
    train = stored(probe_at(512))
    extras = ExtraProbes(
        eval=stored(probe_at(512, step="eval")), lengths={n: {False: stored(probe_at(n))} for n in (64, 288)}
    )
    plan = make_plan(asked, {False: train}, extras)
    plan_id, _ = repository.save_plan_or_existing(engine, plan=plan, request=asked.model_dump(mode="json"))
    engine.dispose()
    with running_api_server(database_url, tmp_path, env={"TUNER_TORCH_MINOR": "2.13"}) as server:
        page = httpx.get(f"{server.base_url}/ui/plans/{plan_id}", timeout=30)
    assert page.status_code == 200
    html = page.text
    text = " ".join(unescape(html).split())
    assert f'Eval micro-batch</dt><dd class="big">{plan.eval_micro_batch_size}</dd>' in html
    assert f'Max tokens per micro-batch</dt><dd class="big">{plan.max_tokens_per_micro_batch}</dd>' in html
    assert "lengths 64–512, set by 512" in text
    assert "Trials of the eval step" in text
    assert f"per_device_eval_batch_size={plan.eval_micro_batch_size}," in text  # the Trainer snippet
    svg = html[
        html.index("<svg", html.index('id="memory-chart"') - 200) : html.index(
            "</svg>", html.index('id="memory-chart"')
        )
        + 6
    ]
    ET.fromstring(svg)  # well-formed
    assert "eval step (training state resident)" in svg and "checkpointing off" in svg
