"""The shipped transformers defaults table against the installed transformers: it is current,
and filling a config from it builds exactly the config transformers builds from the original."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner.transformers_config import canonical_config, defaults_table, known_model_types

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


def test_the_table_matches_the_installed_transformers() -> None:
    table = defaults_table()
    if table["transformers_version"] != transformers.__version__:
        pytest.skip(
            f"the table comes from transformers {table['transformers_version']}, "
            f"{transformers.__version__} is installed: run scripts/transformers_defaults.py"
        )
    assert _generator().build_table() == table


TINY = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 128}


def _built(config: dict[str, Any]) -> dict[str, Any]:
    built: dict[str, Any] = transformers.AutoConfig.for_model(**config).to_dict()
    built.pop("transformers_version", None)
    return built


@pytest.mark.parametrize("model_type", sorted(known_model_types()))
def test_the_filled_config_builds_what_the_given_one_builds(model_type: str) -> None:
    given = {"model_type": model_type, **TINY}
    assert _built(canonical_config(given)) == _built(given)
