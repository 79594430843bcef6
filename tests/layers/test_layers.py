"""The layers of docs/design.md, checked with import-linter's contracts in
pyproject.toml: kept by the repository as it is, broken by each kind of wrong import (shown on a
copy of the packages, so the real tree is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tuner", "probes", "storage", "api")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # The copy's packages come first on the path, ahead of the editable install's finder.
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def copy_of_repo(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "static", "templates")
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copytree(REPO / "tests" / "layers", tmp_path / "tests" / "layers", ignore=ignore)
    (tmp_path / "tests" / "__init__.py").write_text("")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_repository_keeps_every_contract() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_copy_keeps_every_contract(copy_of_repo: Path) -> None:
    # Without this, a broken copy would make the tests below pass for the wrong reason.
    result = lint_imports(copy_of_repo)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken", "shown"),
    [
        (
            "probes.worker",
            "from api.plan_service import derive_plan",
            "Probes and the API never import each other",
            "probes.worker -> api.plan_service",
        ),
        (
            "api.routers.plans",
            "from probes.probe import run_probe",
            "Probes and the API never import each other",
            "api.routers.plans -> probes.probe",
        ),
        (
            "tuner.planner",
            "from storage import repository",
            "The domain imports neither probes, storage nor api",
            "tuner.planner -> storage",
        ),
        (
            "tuner.search",
            "from tuner.integration import plan_for",
            "Only the composition roots import the composition roots",
            "tuner.search -> tuner.integration",
        ),
        (
            # The plan page writes its snippets with the domain's; were they to reach the
            # `plan_for` facade, probes would come into the API process with them.
            "tuner.integrations.snippets",
            "from tuner.integrations.hf import plan_for_trainer",
            "Probes and the API never import each other",
            "tuner.integrations.snippets -> tuner.integrations.hf",
        ),
        (
            "storage.planning",
            "from api.errors import JobFailedError",
            "Storage imports neither probes nor api",
            "storage.planning -> api.errors",
        ),
        (
            "probes.probe",
            "from tuner import __version__ as tuner_version",
            "No import cycles",
            "probes.probe -> tuner -> tuner.integration -> probes.probe",
        ),
        (
            "probes.estimate.trace",
            "from probes.estimate.remote import estimate_peak",
            "No import cycles",
            "probes.estimate.remote -> probes.estimate.session -> probes.estimate.trace -> "
            "probes.estimate.remote",
        ),
    ],
)
def test_a_wrong_import_breaks_its_contract(
    copy_of_repo: Path, module: str, line: str, broken: str, shown: str
) -> None:
    add_import(copy_of_repo, module, line)
    result = lint_imports(copy_of_repo)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{broken} BROKEN" in result.stdout
    assert shown in result.stdout
