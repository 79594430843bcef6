"""`tuner plans`: past plans from a real server (`--server`, `TUNER_SERVER`) and straight from the
seeded database (`--db`), as JSON and as a table."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.integration.ui.conftest import UiServer
from tests.integration.ui.seeding import L4, SCRIPT_NAME
from tuner.cli import app
from tuner.settings import get_settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_server_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_SERVER", raising=False)
    monkeypatch.delenv("TUNER_API_TOKEN", raising=False)
    get_settings.cache_clear()


def _newest_first(ids: list[int]) -> list[int]:
    return sorted(ids, reverse=True)


def _json(args: list[str]) -> dict[str, object]:
    result = runner.invoke(app, ["plans", *args, "--json"])
    assert result.exit_code == 0, result.output
    document: dict[str, object] = json.loads(result.stdout)
    assert set(document) == {"items", "total"}
    return document


def _ids(document: dict[str, object]) -> list[int]:
    items = document["items"]
    assert isinstance(items, list)
    return [int(item["id"]) for item in items]


def test_json_from_the_server_follows_get_v1_plans(ui_server: UiServer) -> None:
    document = _json(["--server", ui_server.base_url, "--limit", "4"])
    assert document["total"] == len(ui_server.plans)
    assert _ids(document) == _newest_first([p.id for p in ui_server.plans])[:4]
    first = document["items"][0]  # type: ignore[index]
    newest = max(ui_server.plans, key=lambda p: p.id)
    assert first["micro_batch_size"] == newest.plan.micro_batch_size
    assert first["device"]["name"] == newest.device.name


def test_the_server_comes_from_tuner_server_too(ui_server: UiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_SERVER", ui_server.base_url)
    get_settings.cache_clear()
    document = _json(["--device", L4.name])
    expected = _newest_first([p.id for p in ui_server.plans if p.device == L4])
    assert _ids(document) == expected and document["total"] == len(expected)


def test_json_from_the_database_equals_json_from_the_server(ui_server: UiServer) -> None:
    local = _json(["--db", ui_server.database_url, "--model", "gpt2", "--limit", "50"])
    remote = _json(["--server", ui_server.base_url, "--model", "gpt2", "--limit", "50"])
    assert _ids(local) == _newest_first([p.id for p in ui_server.plans if p.model == "gpt2"])
    assert local == remote


def test_the_table_shows_names_as_written(ui_server: UiServer) -> None:
    result = runner.invoke(app, ["plans", "--db", ui_server.database_url, "--limit", "3"])
    assert result.exit_code == 0, result.output
    newest = max(ui_server.plans, key=lambda p: p.id)
    assert newest.model == SCRIPT_NAME and SCRIPT_NAME in result.stdout
    assert f"Plans 1–3 of {len(ui_server.plans)}" in result.stdout
    split = f"{newest.plan.micro_batch_size} × {newest.plan.accumulation_steps} × {newest.plan.world_size}"
    assert split in result.stdout


def test_a_missing_database_file_holds_no_plans_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    result = runner.invoke(app, ["plans", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 0 and "No plans in" in result.stdout
    assert not path.exists()
    assert _json(["--db", f"sqlite:///{path}"]) == {"items": [], "total": 0}


def test_a_database_without_the_schema_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()  # an empty SQLite file, not a tuner database
    result = runner.invoke(app, ["plans", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 1
    assert "has no tuner schema" in result.output and "tuner db upgrade" in result.output


def test_server_and_db_together_are_refused(ui_server: UiServer) -> None:
    result = runner.invoke(app, ["plans", "--server", ui_server.base_url, "--db", ui_server.database_url])
    assert result.exit_code == 1 and "either --server or --db" in result.output
