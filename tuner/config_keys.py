"""Intake checks of a transformers config, without importing transformers (or torch): the model
type is one transformers knows and has the spec's head, every key is one its config class
accepts, and the parameters alone do not already overflow the card.

transformers sets any unknown key as a stray attribute and builds the default model, so
`"n_layers": 48` for GPT-2 (whose key is `n_layer`) would be probed as the 12-layer default. The
knowledge comes from `transformers_defaults.json` (`scripts/transformers_defaults.py` writes it
from the transformers it names); model types outside its table are checked for their name only.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from tuner.transformers_config import defaults_table

FLOOR_ROLES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
"""The sizes the parameter floor reads, by their standard names (renamed through a type's aliases)."""


def check_model_type(model_type: str) -> None:
    """Raise `ValueError` naming the nearest known model type when transformers knows no such type."""
    table = defaults_table()
    known = table.get("known_model_types")
    if known is None or model_type in known:
        return
    raise ValueError(
        f"model_type {model_type!r} is not a model type transformers {table['transformers_version']} knows"
        f"{_suggestion(model_type, known)}"
    )


def check_task(model_type: str, task: str) -> None:
    """Raise `ValueError` when the model type has no head for `task` (`causal-lm`, ...)."""
    table = defaults_table()
    with_head = table.get("task_model_types", {}).get(task)
    if with_head is None or model_type in with_head or model_type not in table.get("known_model_types", ()):
        return
    heads = [name for name, types in table["task_model_types"].items() if model_type in types]
    others = (
        f"; it has {', '.join(heads)}"
        if heads
        else "; it has none of causal-lm, masked-lm, seq-classification"
    )
    raise ValueError(f"model.task: {model_type!r} has no {task} head in transformers{others}")


def unknown_keys(config: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """Each key of `config` its model type's config class does not accept, with the nearest key it
    does accept; empty for model types outside the table (nothing is known to check against)."""
    table = defaults_table()
    entry = table["model_types"].get(config.get("model_type"))
    if entry is None or "keys" not in entry:
        return []
    accepted = {"model_type", *table["base_keys"], *entry["defaults"], *entry["aliases"], *entry["keys"]}
    return [(key, _nearest(key, accepted)) for key in config if key not in accepted]


def check_keys(config: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming every key the model type does not accept and the nearest valid one:
    `'n_layers' is not a key of 'gpt2' configs; did you mean 'n_layer'? ...`."""
    unknown = unknown_keys(config)
    if not unknown:
        return
    keys = _and([repr(key) for key, _ in unknown])
    nearest = _and([repr(near) for _, near in unknown if near is not None])
    verb, pronoun = ("is not a key", "it") if len(unknown) == 1 else ("are not keys", "them")
    raise ValueError(
        f"{keys} {verb} of {config['model_type']!r} configs"
        + (f"; did you mean {nearest}?" if nearest else "")
        + f" (transformers {defaults_table()['transformers_version']} would ignore {pronoun} and build "
        "its default)"
    )


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def parameter_floor(config: Mapping[str, Any]) -> int | None:
    """A lower bound on the parameters of the model a canonical config builds, or None where the
    table does not vouch for one: `V·H + L·H·I` (the input embedding and half of a dense MLP per
    layer), checked against real builds by the table's generator."""
    entry = defaults_table()["model_types"].get(config.get("model_type"))
    if entry is None or not entry.get("parameter_floor"):
        return None
    return floor_by_entry(entry, config)


def floor_by_entry(entry: Mapping[str, Any], config: Mapping[str, Any]) -> int | None:
    """`V·H + L·H·I` from a canonical config, the sizes read under the entry's names for them; None
    where the vocabulary, hidden size or layer count is not an integer."""
    sizes = [config.get(entry["aliases"].get(role, role)) for role in FLOOR_ROLES]
    vocab, hidden, layers, intermediate = (
        value if isinstance(value, int) and not isinstance(value, bool) else None for value in sizes
    )
    if vocab is None or hidden is None or layers is None:
        return None
    return vocab * hidden + layers * hidden * (intermediate or 0)


def _nearest(word: str, candidates: Any) -> str | None:
    """The closest candidate by `difflib`'s ratio: a close one if there is, else the least far."""
    ordered = sorted(candidates)
    found = difflib.get_close_matches(word, ordered, n=1, cutoff=0.6) or difflib.get_close_matches(
        word, ordered, n=1, cutoff=0.0
    )
    return found[0] if found else None


def _suggestion(word: str, candidates: Any) -> str:
    near = _nearest(word, candidates)
    return f"; did you mean {near!r}?" if near else ""
