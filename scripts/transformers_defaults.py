"""Write `tuner/transformers_defaults.json`: the static defaults and alias names of the
transformers config classes that people train most, read from the installed transformers.

The API process validates and fingerprints specs without importing torch, and transformers 5
imports torch with any config class; this table lets it fill a config's defaults anyway, so that
`{"model_type": "gpt2"}` and `{"model_type": "gpt2", "n_layer": 12}` get one fingerprint.

Only defaults that are constants in the class's signature are kept: a default of `None` that
the class derives from other fields later (`num_key_value_heads`, `head_dim`) stays `None`, so
filling it changes nothing. Fields of the base config class (output switches, label maps,
`dtype`) are left out: they do not shape the model.

Run: `.venv/bin/python scripts/transformers_defaults.py` after upgrading transformers, and commit
the file; `tests/unit/test_transformers_defaults.py` fails while it is stale.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).resolve().parents[1] / "tuner" / "transformers_defaults.json"

# Decoder LMs, their mixture-of-experts variants and the common encoders (masked-lm and
# seq-classification tasks); configs whose model fields are flat (no nested sub-configs).
MODEL_TYPES = (
    "bert",
    "bloom",
    "deepseek_v3",
    "falcon",
    "gemma",
    "gemma2",
    "gpt2",
    "gpt_bigcode",
    "gpt_neox",
    "gptj",
    "granite",
    "llama",
    "mistral",
    "mixtral",
    "olmo",
    "olmo2",
    "opt",
    "phi",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "roberta",
    "starcoder2",
)

_JSON_SCALARS = (type(None), bool, int, float, str)


def _constant_default(value: Any) -> bool:
    return isinstance(value, _JSON_SCALARS)


def _signature_defaults(config_class: type) -> dict[str, Any]:
    parameters = inspect.signature(config_class.__init__).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not inspect.Parameter.empty
        and _constant_default(p.default)
    }


def build_table() -> dict[str, Any]:
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.configuration_utils import PreTrainedConfig

    base_fields = set(_signature_defaults(PreTrainedConfig)) | set(
        inspect.signature(PreTrainedConfig.__init__).parameters
    )
    model_types: dict[str, Any] = {}
    for model_type in MODEL_TYPES:
        config_class = CONFIG_MAPPING[model_type]
        defaults = {
            name: value
            for name, value in _signature_defaults(config_class).items()
            if name not in base_fields
        }
        # An alias that is also a field of the class (Qwen3-MoE's `num_experts`) is not renamed:
        # which name wins depends on the class's own code.
        fields = set(inspect.signature(config_class.__init__).parameters)
        aliases = {
            alias: field
            for alias, field in sorted(getattr(config_class, "attribute_map", {}).items())
            if alias not in fields
        }
        model_types[model_type] = {"defaults": dict(sorted(defaults.items())), "aliases": aliases}
    return {"transformers_version": transformers.__version__, "model_types": model_types}


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main() -> int:
    TABLE_PATH.write_text(render(build_table()), encoding="utf-8")
    print(f"wrote {TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
