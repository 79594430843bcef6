"""Canonical transformers configs from the shipped defaults table, without importing transformers.

tests/probes/test_transformers_defaults.py checks the table against the installed transformers.
"""

from __future__ import annotations

import pytest

from tuner.errors import SpecError
from tuner.spec import parse_workload
from tuner.transformers_config import canonical_config, defaults_table, known_model_types


def workload(config: dict[str, object], seq_len: int = 64) -> dict[str, object]:
    return {
        "model": {"family": "transformers", "config": config, "task": a_task_of(str(config["model_type"]))},
        "inputs": {"kind": "tokens", "seq_len": seq_len},
    }


def a_task_of(model_type: str) -> str:
    """A head the model type has (masked-lm-only types exist: BERT's relatives)."""
    heads = defaults_table()["task_model_types"]
    return next((task for task, types in heads.items() if model_type in types), "causal-lm")


def test_missing_fields_take_the_model_types_defaults() -> None:
    config = canonical_config({"model_type": "gpt2", "n_layer": 2})
    assert config["n_layer"] == 2
    assert config["n_embd"] == 768 and config["vocab_size"] == 50257
    assert config["activation_function"] == "gelu_new"


def test_alias_names_become_the_field_they_stand_for() -> None:
    config = canonical_config({"model_type": "gpt2", "num_hidden_layers": 3, "hidden_size": 64})
    assert "num_hidden_layers" not in config and "hidden_size" not in config
    assert config["n_layer"] == 3 and config["n_embd"] == 64


def test_an_alias_agreeing_with_its_field_is_merged() -> None:
    config = canonical_config({"model_type": "gpt2", "num_hidden_layers": 3, "n_layer": 3})
    assert config["n_layer"] == 3 and "num_hidden_layers" not in config


def test_an_alias_contradicting_its_field_is_refused_naming_both() -> None:
    with pytest.raises(SpecError) as caught:
        parse_workload(workload({"model_type": "gpt2", "num_hidden_layers": 3, "n_layer": 4}))
    message = str(caught.value)
    assert "model.config" in message
    assert "num_hidden_layers=3" in message and "n_layer=4" in message


def test_an_integer_for_a_float_field_is_that_float() -> None:
    implied = parse_workload(workload({"model_type": "llama"}))
    explicit = parse_workload(
        workload({"model_type": "llama", "attention_dropout": 0, "initializer_range": 0.02})
    )
    assert explicit.fingerprint() == implied.fingerprint()
    assert canonical_config({"model_type": "llama", "attention_dropout": 1})["attention_dropout"] == 1.0
    assert canonical_config({"model_type": "llama", "use_cache": False})["use_cache"] is False


def test_an_unknown_model_type_keeps_its_config_as_given() -> None:
    config = {"model_type": "my-own-lm", "hidden_size": 64}
    assert canonical_config(config) == config


def test_derived_defaults_stay_unset_so_filling_them_changes_nothing() -> None:
    # LlamaConfig derives num_key_value_heads and head_dim from the attention heads when None.
    config = canonical_config({"model_type": "llama", "num_attention_heads": 8})
    assert config["num_key_value_heads"] is None and config["head_dim"] is None


@pytest.mark.parametrize("model_type", sorted(known_model_types()))
def test_every_model_type_validates_with_its_defaults_and_reparses_to_the_same_fingerprint(
    model_type: str,
) -> None:
    # The worker re-validates the stored canonical JSON: every default must pass the size
    # bounds, and canonical form must be a fixed point.
    spec = parse_workload(workload({"model_type": model_type}))
    again = parse_workload(spec.model_dump(mode="json"))
    assert again.canonical_json() == spec.canonical_json()


def test_the_table_names_the_transformers_it_came_from() -> None:
    table = defaults_table()
    assert table["transformers_version"].count(".") >= 1
    assert {"gpt2", "llama", "mixtral", "qwen2"} <= known_model_types()


def test_maximum_positions_are_not_filled_so_only_a_given_one_limits_seq_len() -> None:
    # Llama (rotary) trains past its default of 2048 positions; a given limit still holds.
    spec = parse_workload(workload({"model_type": "llama"}, seq_len=4096))
    assert spec.model.config is not None and "max_position_embeddings" not in spec.model.config
    with pytest.raises(SpecError, match=r"maximum positions \(2048\)"):
        parse_workload(workload({"model_type": "llama", "max_position_embeddings": 2048}, seq_len=4096))
