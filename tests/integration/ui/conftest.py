"""A real uvicorn server on a seeded SQLite database, and a real headless Chromium driven through
chromedriver (selenium), shared by the page tests.

The database is seeded through the repository before the server starts (see `seeding.py`); no
worker runs, so the seeded jobs stay queued and running. Chromium is Debian's (`make browser`
installs it); without it the browser tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from storage.db import ensure_schema, make_engine
from tests.integration.ui.seeding import SeededJobs, SeededPlan, seed_jobs, seed_plans
from tests.servers import ServerProcess, start_api_server

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "test-artifacts" / "ui"
SEED_START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver",)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
LAPTOP_WIDTH = 1280
PHONE_WIDTH = 390


@dataclass
class UiServer:
    """The running server, its database and what was seeded into it."""

    database_url: str
    engine: Engine
    plans: list[SeededPlan]
    jobs: SeededJobs
    process: ServerProcess

    @property
    def base_url(self) -> str:
        return self.process.base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.process.log()


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    directory = tmp_path_factory.mktemp("ui")
    database_url = f"sqlite:///{directory / 'tuner.db'}"
    engine = make_engine(database_url)
    ensure_schema(engine)
    plans = seed_plans(engine, start=SEED_START)
    jobs = seed_jobs(engine)
    process = start_api_server(database_url, directory, env={"TUNER_TORCH_MINOR": "2.13"})
    try:
        yield UiServer(database_url, engine, plans, jobs, process)
    finally:
        process.stop()
        engine.dispose()


@pytest.fixture(scope="session")
def http(ui_server: UiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ui_server.base_url, timeout=30, follow_redirects=False) as client:
        yield client


def _first_executable(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium with a fresh profile; skipped (with the reason) when it is absent."""
    with chromium_driver() as driver:
        yield driver


OFFLINE_FLAGS = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)
"""No host but this machine resolves: a page that needs the network shows it."""


@contextmanager
def chromium_driver(extra_flags: tuple[str, ...] = ()) -> Iterator[Any]:
    """A headless Chromium session (see `browser`), with `extra_flags` added."""
    chromium = _first_executable(CHROMIUM_CANDIDATES, "chromium")
    chromedriver = _first_executable(CHROMEDRIVER_CANDIDATES, "chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(
            "Chromium or chromedriver is not installed (Debian packages chromium and chromium-driver; "
            "`make browser` installs them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, *extra_flags):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="tuner-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_viewport(driver: Any, width: int, height: int = 900) -> None:
    """Emulate a screen `width` CSS pixels wide (a phone with `PHONE_WIDTH`: touch viewport)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
    )


def screenshot(driver: Any, name: str, width: int) -> Path:
    """The whole page at `width`, as `test-artifacts/ui/<name>-<width>.png`."""
    set_viewport(driver, width)
    full_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    set_viewport(driver, width, min(max(full_height, 600), 8000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}-{width}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    set_viewport(driver, width)
    return path
