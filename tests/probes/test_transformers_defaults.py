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


# ----------------------------------------------------------------------- the intake key checks


@pytest.mark.parametrize("model_type", sorted(known_model_types()))
def test_every_key_transformers_writes_for_a_config_is_accepted(model_type: str) -> None:
    # What a config saved by transformers holds (its to_dict: fields, base keys, token ids) must
    # pass the intake check; a spec copied from a checkpoint's config.json then validates.
    from tuner.config_keys import unknown_keys

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r}")
    saved = transformers.AutoConfig.for_model(model_type).to_dict()
    assert unknown_keys(saved) == []


def test_keys_every_config_accepts_are_accepted_for_every_type() -> None:
    # Checked against what real transformers configs hold: the base keys, the vocabulary (where
    # the model has one) and each type's own dropout names stay accepted.
    from tuner.config_keys import unknown_keys

    for model_type, entry in defaults_table()["model_types"].items():
        if model_type not in transformers.CONFIG_MAPPING:
            continue
        saved = transformers.AutoConfig.for_model(model_type).to_dict()
        config = {"model_type": model_type, "tie_word_embeddings": True, "pad_token_id": 0}
        config |= {"bos_token_id": 0, "torch_dtype": "float32", "num_labels": 2}
        if "vocab_size" in saved:
            config["vocab_size"] = 1000
        config |= {key: 0.0 for key in entry["defaults"] if "dropout" in key or "pdrop" in key}
        assert unknown_keys(config) == [], model_type


def test_a_stray_key_is_one_transformers_itself_would_ignore() -> None:
    # The refusal is right: transformers builds the default depth from GPT-2's `n_layers`.
    built = transformers.AutoConfig.for_model("gpt2", n_layers=48)
    assert built.n_layer == 12


def test_the_parameter_floor_stays_under_real_parameter_counts() -> None:
    import torch

    from tuner.config_keys import parameter_floor
    from tuner.transformers_config import canonical_config

    for given in (
        {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
        {"model_type": "gpt2", "n_layer": 6, "n_embd": 512, "n_head": 8},
        {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
         "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
    ):  # fmt: skip
        config = canonical_config(given)
        floor = parameter_floor(config)
        assert floor is not None
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
        count = sum(p.numel() for p in model.parameters())
        assert 0.2 * count < floor <= count, (given["model_type"], floor, count)
