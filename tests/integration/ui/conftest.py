"""A real uvicorn server on a seeded SQLite database, and a real headless Chromium driven through
chromedriver (selenium), shared by the page tests.

The database is seeded through the repository before the server starts (see `seeding.py`); no
worker runs, so the seeded jobs stay queued and running. Chromium is Debian's (`make browser`
installs it); without it the browser tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from storage.db import ensure_schema, make_engine
from tests.integration.ui.seeding import SeededJobs, SeededPlan, seed_jobs, seed_plans

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class UiServer:
    """The running server, its database and what was seeded into it."""

    base_url: str
    database_url: str
    engine: Engine
    plans: list[SeededPlan]
    jobs: SeededJobs
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiServer]:
    directory = tmp_path_factory.mktemp("ui")
    database_url = f"sqlite:///{directory / 'tuner.db'}"
    engine = make_engine(database_url)
    ensure_schema(engine)
    plans = seed_plans(engine, start=SEED_START)
    jobs = seed_jobs(engine)
    port = _free_port()
    env = {**os.environ, "TUNER_DATABASE_URL": database_url, "TUNER_TORCH_MINOR": "2.13"}
    env.pop("TUNER_API_TOKEN", None)
    log_path = directory / "uvicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = UiServer(f"http://127.0.0.1:{port}", database_url, engine, plans, jobs, process, log_path)
    try:
        _wait_until_up(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        engine.dispose()


def _wait_until_up(server: UiServer) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the API server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url("/healthz"), timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API server did not answer within 60 s:\n{server.log()}")


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
    for flag in CHROMIUM_FLAGS:
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
