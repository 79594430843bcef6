"""The shipped transformers defaults table against the installed transformers: it is current,
and filling a config from it builds exactly the config transformers builds from the original."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner.transformers_config import defaults_table, known_model_types

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "transformers_defaults", REPO / "scripts/transformers_defaults.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


def test_the_table_matches_the_installed_transformers() -> None:
    table = defaults_table()
    if table["transformers_version"] != transformers.__version__:
        pytest.skip(
            f"the table comes from transformers {table['transformers_version']}, "
            f"{transformers.__version__} is installed: run scripts/transformers_defaults.py"
        )
    assert GENERATOR.build_table() == table


@pytest.mark.parametrize("model_type", sorted(known_model_types()))
def test_the_filled_config_builds_what_the_given_one_builds(model_type: str) -> None:
    # Checked again here because the installed transformers may be another version than the
    # table's: a default or an alias that changed meaning shows up as a different build.
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r}")
    entry = defaults_table()["model_types"][model_type]
    assert GENERATOR.fills_faithfully(model_type, entry)


def test_a_config_whose_fill_would_change_the_build_is_caught() -> None:
    entry = {"defaults": {"n_layer": 3}, "aliases": {}}  # GPT-2's default is 12: a wrong table
    assert not GENERATOR.fills_faithfully("gpt2", entry)
