"""A transformers config in canonical form, without importing transformers (or torch).

Two spellings of one model must fingerprint alike: `{"model_type": "gpt2"}` and
`{"model_type": "gpt2", "n_layer": 12}`, or `num_hidden_layers` for GPT-2's `n_layer`. The
shipped table (`transformers_defaults.json`, written by `scripts/transformers_defaults.py` from
the transformers named in it) holds each text model type's constant defaults and alias names;
alias names are renamed to the field they stand for and missing fields take their defaults.

Model types outside the table keep the config as given. A default the config class derives from
other fields (`num_key_value_heads`, `head_dim`) is `None` in the table, so an explicit derived
value (`num_key_value_heads` equal to `num_attention_heads`) still fingerprints differently from
leaving it out; the model is the same, the cache simply holds it twice.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def defaults_table() -> dict[str, Any]:
    """The shipped table: `{"transformers_version": ..., "model_types": {type: {"defaults", "aliases"}}}`."""
    text = resources.files("tuner").joinpath("transformers_defaults.json").read_text(encoding="utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def known_model_types() -> frozenset[str]:
    """The model types whose defaults are filled in."""
    return frozenset(defaults_table()["model_types"])


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` with alias names renamed and the model type's constant defaults filled in.

    Raises `ValueError` when a field is given under two names with different values.
    """
    entry = defaults_table()["model_types"].get(config.get("model_type"))
    if entry is None:
        return dict(config)
    return apply_entry(entry, config)


def apply_entry(entry: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """`config` canonicalised by one table entry (`{"defaults": ..., "aliases": ...}`)."""
    result = dict(config)
    for alias, field in entry["aliases"].items():
        if alias not in result:
            continue
        value = result.pop(alias)
        if field in result and result[field] != value:
            raise ValueError(
                f"gives {alias}={value!r} and {field}={result[field]!r}, but {alias} is another name "
                f"for {field} in {config['model_type']!r} configs: give one of them"
            )
        result[field] = value
    for field, default in entry["defaults"].items():
        value = result.setdefault(field, default)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            result[field] = float(value)  # `"attention_dropout": 0` is the default 0.0, in JSON too
    return result
