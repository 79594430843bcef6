"""Write `tuner/transformers_defaults.json`: the constant defaults and alias names of the
transformers config classes of every text model type (causal-lm, masked-lm and
seq-classification heads), the keys each of them accepts, the model types transformers knows
(and which have each head), and where a parameter-count floor holds, read from the installed
transformers.

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

The intake checks (`tuner/config_keys.py`) read the rest:
- `known_model_types` and `task_model_types`: a `model_type` transformers does not know, or that
  has no head for the spec's task, is refused before a job is queued.
- Per model type, `keys`: the fields of its config class that are neither defaults nor aliases;
  with `base_keys` (what every config accepts: the base class's fields, the keyword arguments its
  `__post_init__` consumes, the generation parameters it drops, and the base keys of
  transformers 4 that configs saved on the hub still carry) that is every key the type accepts.
  Any other key would be set as a stray attribute and ignored: refused, naming the nearest key.
- `parameter_floor`: true where `V·H + L·H·I` (vocabulary × hidden size, plus layers × hidden
  × intermediate size: the input embedding and half of a dense MLP per layer) was checked here
  to stay below the parameter count of the base model, for the type's default config and for
  small sizes. The API then refuses at intake a card whose budget cannot hold those parameters'
  weights, gradients and optimizer state, before any probe.

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

from tuner.config_keys import FLOOR_ROLES, floor_by_entry  # noqa: E402
from tuner.spec import CONFIG_BOUNDS, POSITION_KEYS  # noqa: E402
from tuner.transformers_config import apply_entry  # noqa: E402

SMALL_SIZES = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 128}
"""The sizes a verification build gives (alias names are renamed for classes that use others)."""

_JSON_SCALARS = (type(None), bool, int, float, str)

TASK_MAPPINGS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
}
"""`tuner.spec.Task` → the transformers auto mapping of that head."""
BASE_KWARGS = (
    "attn_implementation",
    "experts_implementation",
    "name_or_path",
    "num_labels",
    "output_attentions",
    "per_layer_config",
    "torch_dtype",
    "_commit_hash",
    "_name_or_path",
)
"""Keys `PreTrainedConfig.__post_init__` (transformers 5) takes from its keyword arguments."""
LEGACY_BASE_KEYS = (
    "add_cross_attention",
    "bos_token_id",
    "cross_attention_hidden_size",
    "decoder_start_token_id",
    "eos_token_id",
    "finetuning_task",
    "is_decoder",
    "pad_token_id",
    "prefix",
    "pruned_heads",
    "sep_token_id",
    "task_specific_params",
    "tf_legacy_loss",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "tokenizer_class",
    "torchscript",
    "use_bfloat16",
)
"""Base-config keys of transformers 4 that configs saved on the hub still carry; transformers 5
keeps the token ids and tying on each model's class and accepts the rest as plain attributes."""
ROPE_KWARGS = ("rope_scaling", "rope_theta", "partial_rotary_factor")
"""Older rotary keys a config with `rope_parameters` converts into it."""


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


def base_keys() -> list[str]:
    """Keys every config accepts, whatever its model type."""
    from transformers import GenerationConfig
    from transformers.configuration_utils import PreTrainedConfig

    names = set(_signature(PreTrainedConfig)) - {"self", "kwargs"}
    names.update(BASE_KWARGS, LEGACY_BASE_KEYS, GenerationConfig._get_default_generation_params())
    return sorted(names)


def own_keys(model_type: str, config_class: type, entry: dict[str, Any], base: set[str]) -> list[str]:
    """The keys a config class accepts beyond `base` and its entry's defaults and aliases: its
    fields, every name of its `attribute_map` (the entry renames only some), older rotary keys,
    and what its saved form holds (attributes the class derives itself, such as DeepSeek's
    `qk_head_dim`: a config.json written by transformers carries them)."""
    from transformers import AutoConfig

    fields = set(_signature(config_class)) - {"self", "kwargs"}
    fields.update(getattr(config_class, "attribute_map", {}))
    fields.update(AutoConfig.for_model(model_type).to_dict())
    if "rope_parameters" in fields:
        fields.update(ROPE_KWARGS)
    return sorted(fields - base - set(entry["defaults"]) - set(entry["aliases"]))


def task_model_types() -> dict[str, list[str]]:
    """The model types with each head `tuner.spec.Task` names."""
    from transformers.models.auto import modeling_auto

    return {task: sorted(getattr(modeling_auto, name)) for task, name in TASK_MAPPINGS.items()}


def has_floor_sizes(entry: dict[str, Any], config_class: type) -> bool:
    """Whether the class names the vocabulary, hidden size and layer count the floor reads."""
    fields = set(_signature(config_class))
    return all(entry["aliases"].get(role, role) in fields for role in FLOOR_ROLES[:3])


def floor_holds(model_type: str, entry: dict[str, Any], config_class: type) -> bool:
    """Whether the floor stays at or below the base model's parameter count (built on the meta
    device) for the type's default config and for small sizes."""
    import torch
    from transformers import AutoConfig, AutoModel

    if not has_floor_sizes(entry, config_class):
        return False
    for given in ({"model_type": model_type}, {"model_type": model_type, **SMALL_SIZES}):
        config = apply_entry(entry, given)
        floor = floor_by_entry(entry, config)
        if floor is None:
            return False
        try:
            built = AutoConfig.for_model(**config)
            with torch.device("meta"):
                model = AutoModel.from_config(built)
        except Exception:
            return False
        if floor > sum(parameter.numel() for parameter in model.parameters()):
            return False
    return True


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
    base = set(base_keys())
    model_types: dict[str, Any] = {}
    for model_type in text_model_types():
        if model_type not in CONFIG_MAPPING:
            continue
        config_class = CONFIG_MAPPING[model_type]
        if any(name.endswith("_config") for name in _signature(config_class)):
            continue  # nested sub-configs: filled only at their top level, so left as given
        entry = entry_for(config_class, base_fields)
        if fills_faithfully(model_type, entry):
            entry["keys"] = own_keys(model_type, config_class, entry, base)
            entry["parameter_floor"] = floor_holds(model_type, entry, config_class)
            model_types[model_type] = entry
    return {
        "transformers_version": transformers.__version__,
        "model_types": model_types,
        "base_keys": sorted(base),
        "known_model_types": sorted(CONFIG_MAPPING.keys()),
        "task_model_types": task_model_types(),
    }


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main() -> int:
    table = build_table()
    TABLE_PATH.write_text(render(table), encoding="utf-8")
    print(f"wrote {TABLE_PATH}: {len(table['model_types'])} model types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
