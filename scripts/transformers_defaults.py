"""Write `tuner/transformers_defaults.json`: the constant defaults and alias names of the
transformers config classes of every text model type (causal-lm, masked-lm and
seq-classification heads), read from the installed transformers.

The API process validates and fingerprints specs without importing torch, and transformers 5
imports torch with any config class; this table lets it fill a config's defaults anyway, so that
`{"model_type": "gpt2"}` and `{"model_type": "gpt2", "n_layer": 12}` get one fingerprint.

What goes in, and why it is safe:
- Only defaults that are constants in the class's signature. A default of `None` that the class
  derives from other fields later (`num_key_value_heads`, `head_dim`) stays `None`, so filling it
  changes nothing. Fields of the base config class (output switches, label maps, `dtype`) are
  left out: they do not shape the model.
- A default outside the size bounds a server enforces (`tuner.spec.CONFIG_BOUNDS`) is left out,
  so that a filled spec always validates again. So are the maximum positions
  (`tuner.spec.POSITION_KEYS`): a `seq_len` beyond a position count the spec gives is refused,
  and a rotary model (Llama's default is 2048) trains past its default, so filling it in would
  refuse workloads that run.
- A model type goes in only when filling and renaming are checked here to build exactly the
  config transformers builds from the original, bare and with small sizes given. Types with
  nested sub-configs (multimodal models) are left out.

Run: `.venv/bin/python scripts/transformers_defaults.py` after upgrading transformers, and commit
the file; `tests/probes/test_transformers_defaults.py` fails while it is stale.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TABLE_PATH = REPO / "tuner" / "transformers_defaults.json"
sys.path.insert(0, str(REPO))

from tuner.spec import CONFIG_BOUNDS, POSITION_KEYS  # noqa: E402
from tuner.transformers_config import apply_entry  # noqa: E402

SMALL_SIZES = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 128}
"""The sizes a verification build gives (alias names are renamed for classes that use others)."""

_JSON_SCALARS = (type(None), bool, int, float, str)


def _signature(config_class: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(config_class.__init__).parameters)


def _signature_defaults(config_class: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in _signature(config_class).items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not inspect.Parameter.empty
        and isinstance(p.default, _JSON_SCALARS)
    }


def _within_bounds(name: str, value: Any) -> bool:
    bound = CONFIG_BOUNDS.get(name)
    if bound is None or value is None:
        return True
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= bound


def text_model_types() -> list[str]:
    """Model types with a causal-lm, masked-lm or seq-classification head."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    ):
        names.update(mapping)
    return sorted(names)


def entry_for(config_class: type, base_fields: set[str]) -> dict[str, Any]:
    """The table entry of one config class: its defaults and alias names."""
    defaults = {
        name: value
        for name, value in _signature_defaults(config_class).items()
        if name not in base_fields and name not in POSITION_KEYS and _within_bounds(name, value)
    }
    # An alias that is also a field of the class (Qwen3-MoE's `num_experts`) is not renamed:
    # which name wins depends on the class's own code. Nor are maximum positions (see above):
    # renaming one to a name the seq_len check does not know would lift the limit.
    fields = set(_signature(config_class))
    aliases = {
        alias: field
        for alias, field in sorted(getattr(config_class, "attribute_map", {}).items())
        if alias not in fields and alias not in POSITION_KEYS and field not in POSITION_KEYS
    }
    return {"defaults": dict(sorted(defaults.items())), "aliases": aliases}


def _built(config: dict[str, Any]) -> dict[str, Any] | None:
    """The config transformers builds from `config`, or None where it refuses it."""
    from transformers import AutoConfig

    try:
        built: dict[str, Any] = AutoConfig.for_model(**config).to_dict()
    except Exception:
        return None
    built.pop("transformers_version", None)
    return built


def fills_faithfully(model_type: str, entry: dict[str, Any]) -> bool:
    """Whether canonicalising with `entry` builds what transformers builds from the original:
    for the bare config (which must build), and with small sizes given (where those build)."""
    for given in ({"model_type": model_type}, {"model_type": model_type, **SMALL_SIZES}):
        original = _built(given)
        if original is None:
            if len(given) == 1:
                return False
            continue
        if _built(apply_entry(entry, given)) != original:
            return False
    return True


def build_table() -> dict[str, Any]:
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.configuration_utils import PreTrainedConfig

    logging.getLogger("transformers").setLevel(logging.ERROR)  # the checks' size warnings
    base_fields = set(_signature(PreTrainedConfig))
    model_types: dict[str, Any] = {}
    for model_type in text_model_types():
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = CONFIG_MAPPING[model_type]
        if any(name.endswith("_config") for name in _signature(config_class)):
            continue  # nested sub-configs: filled only at their top level, so left as given
        entry = entry_for(config_class, base_fields)
        if fills_faithfully(model_type, entry):
            model_types[model_type] = entry
    return {"transformers_version": transformers.__version__, "model_types": model_types}


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main() -> int:
    table = build_table()
    TABLE_PATH.write_text(render(table), encoding="utf-8")
    print(f"wrote {TABLE_PATH}: {len(table['model_types'])} model types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
