"""The API process never imports torch nor transformers: a fresh interpreter creates the app,
serves requests (a cached plan, a queued job, a refusal without a worker, transformers configs
checked against their model type's keys, the metrics, the pages, a plan's page with its snippets)
and then finds neither in `sys.modules`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import sys
    from fastapi.testclient import TestClient
    from api.app import create_app
    from tuner.settings import Settings
    from tests.integration.api.seeding import OTHER_DEVICE, mlp_workload, plan_request, seed_probes

    app = create_app(Settings(database_url=sys.argv[1], torch_minor="2.13"))
    seed_probes(app.state.context.engine, mlp_workload())
    gpt2 = {"model": {"family": "transformers", "config": {"model_type": "gpt2", "n_layer": 2}},
            "inputs": {"kind": "tokens", "seq_len": 128}}
    with TestClient(app) as client:
        planned = client.post("/v1/plans", json=plan_request())
        assert planned.status_code == 200, planned.text
        queued = client.post("/v1/plans?queue_without_worker=true", json=plan_request(device=OTHER_DEVICE))
        assert queued.status_code == 202, queued.text
        refused = client.post("/v1/plans", json=plan_request(device=OTHER_DEVICE))
        assert refused.json()["code"] == "no_worker", refused.text
        typo = {**plan_request(), "workload": {**gpt2, "model": {"family": "transformers",
                "config": {"model_type": "gpt2", "n_layers": 2}}}}
        assert "'n_layer'" in client.post("/v1/plans", json=typo).json()["detail"]
        known = client.post("/v1/plans?queue_without_worker=true", json={**plan_request(), "workload": gpt2})
        assert known.status_code == 202, known.text
        assert client.get("/metrics").status_code == 200
        assert client.get("/ui/plans").status_code == 200
        plan_page = client.get(f"/ui/plans/{planned.json()['id']}")
        assert plan_page.status_code == 200 and "TrainingArguments(" in plan_page.text, plan_page.text
        assert client.get("/ui/jobs").status_code == 200
    heavy = ("torch", "transformers")
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in heavy)
    print("torch or transformers modules:", loaded)
    sys.exit(1 if loaded else 0)
    """
)


def test_the_api_process_never_imports_torch_or_transformers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
