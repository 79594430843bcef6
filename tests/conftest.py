"""Shared fixtures. Paths to the shared benchmark workloads; settings reset between tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.settings import get_settings

REPO = Path(__file__).resolve().parent.parent
BENCH_WORKLOADS = REPO.parent / "shared" / "bench" / "workloads"


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Settings are read once per process; a test that changes the environment gets fresh ones."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()
