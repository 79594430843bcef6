"""The API process never imports torch: a fresh interpreter creates the app, serves requests
(a cached plan, a queued job, the metrics) and then finds no torch in `sys.modules`."""

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
    with TestClient(app) as client:
        assert client.post("/v1/plans", json=plan_request()).status_code == 200
        assert client.post("/v1/plans", json=plan_request(device=OTHER_DEVICE)).status_code == 202
        assert client.get("/metrics").status_code == 200
        assert client.get("/ui/plans").status_code == 200
    loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
    print("torch modules:", loaded)
    sys.exit(1 if loaded else 0)
    """
)


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
