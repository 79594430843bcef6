"""A fresh clone, the README's first command: `make run` creates its own virtualenv with the
runtime dependencies only (no test tools), reaches a healthy server and prints one line with the
URLs of the pages and the API docs, without Alembic's start-up chatter. pip's cache and the local
torch wheel keep it to a minute or two on a 2-core CPU container."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import REPO, free_port

pytestmark = pytest.mark.slow

DEV_ONLY = ("pytest", "selenium", "schemathesis", "mypy", "ruff", "hypothesis", "lightning")
"""Packages of the dev extras that serving must not install."""


def _clone(destination: Path) -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(REPO), str(destination)], check=True)
    subprocess.run(["git", "-C", str(destination), "checkout", "--quiet", head], check=True)


@pytest.mark.timeout(1200)
def test_make_run_on_a_fresh_clone_serves_and_says_where(tmp_path: Path) -> None:
    clone = tmp_path / "tuner"
    _clone(clone)
    port = free_port()
    log_path = tmp_path / "make-run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNER_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    with log_path.open("w") as log:
        make = subprocess.Popen(
            ["make", "run", f"PORT={port}"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 1000
        url = f"http://127.0.0.1:{port}"
        ready = f"tuner is serving {url}: web pages {url}/ui, API docs {url}/docs"
        while ready not in log_path.read_text(errors="replace"):
            assert make.poll() is None, f"make run exited:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no ready line:\n{log_path.read_text()[-4000:]}"
            time.sleep(1)
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok", "database": "ok"}
        assert httpx.get(f"{url}/ui/plans", timeout=10).status_code == 200
        assert "swagger-ui-bundle.js" in httpx.get(f"{url}/docs", timeout=10).text
        output = log_path.read_text(errors="replace")
        assert output.count(ready) == 1
        assert "INFO alembic" not in output, output[-4000:]  # pip's own lines name the package
        venv_python = clone / ".venv" / "bin" / "python"
        for package in DEV_ONLY:
            check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) is not None)"
            found = subprocess.run([str(venv_python), "-c", check], capture_output=True)
            assert found.returncode == 0, f"make run installed {package}, a dev-only package"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGTERM)
            try:
                make.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(make.pid, signal.SIGKILL)
                make.wait()
