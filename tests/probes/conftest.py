"""Fixtures of the probe tests."""

from __future__ import annotations

import pytest

from tuner.settings import get_settings


@pytest.fixture(autouse=True)
def allow_test_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allow `python` factories from the `tests` package (tests/probes/factories.py); a test that
    needs the default (nothing allowed) deletes the variable and clears the settings again."""
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "tests")
    get_settings.cache_clear()
