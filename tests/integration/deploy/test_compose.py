"""`docker-compose.yml` and the `Dockerfile` describe the deployment docs/design.md promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]


def compose_config() -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors, merges, variables)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    done = subprocess.run(
        [binary, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "pw", "TUNER_API_TOKEN": "tok"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_docker_compose_accepts_the_file_and_wires_the_fleet() -> None:
    services = compose_config()["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}

    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    url = "postgresql+psycopg://tuner:pw@postgres:5432/tuner"
    assert services["migrate"]["command"] == ["db", "upgrade", "--db", url]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    api = services["api"]
    assert api["command"][:2] == ["serve", "--no-worker"] and url in api["command"]
    assert "0.0.0.0" in api["command"]
    assert api["environment"]["TUNER_API_TOKEN"] == "tok"
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    worker = services["worker"]
    assert worker["command"] == ["worker", "--backend", "cuda", "--db", url]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    assert "cu" in worker["build"]["args"]["TORCH_INDEX_URL"]


def test_the_image_installs_the_package_with_cpu_torch_by_default() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "pip install . " in dockerfile or "pip install .\n" in dockerfile
    # Everything the package ships is copied into the build context it installs from.
    for package in ("tuner", "probes", "storage", "api"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["tuner"]' in dockerfile
