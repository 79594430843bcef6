"""What a live model's config says, as a spec writes it: JSON values, and nothing the config's
class would derive by itself. Shared by the `plan_for` facade and the custom-code workloads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any


def without_implied_values(config: Any, config_dict: dict[str, Any]) -> dict[str, Any]:
    """`config_dict` less every value the config class would derive by itself without it.

    `to_diff_dict` keeps values a class computes when they are left out (Llama's
    `num_key_value_heads` and `head_dim`, its `rope_parameters`), which a person writing the same
    spec by hand leaves out; dropping them gives the hand-written spec's fingerprint. A value is
    dropped only when the class, built without it, has exactly the same configuration.
    """
    config_class = type(config)
    reference = _comparable_config(config)
    result = dict(config_dict)
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)  # the trial builds repeat the config's own warnings
    try:
        for key in [k for k in config_dict if k != "model_type"]:
            trial = {k: v for k, v in result.items() if k not in (key, "model_type")}
            try:
                rebuilt = config_class(**trial)
            except Exception:  # the class needs the value (or refuses the rest without it): keep it
                continue
            if _comparable_config(rebuilt) == reference:
                result.pop(key)
    finally:
        transformers_logger.setLevel(level)
    return result


def _comparable_config(config: Any) -> Any:
    values = json_safe(config.to_dict())
    values.pop("transformers_version", None)
    return values


def parameter_dtype_name(model: Any) -> str | None:
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    for parameter in parameters():
        return str(parameter.dtype).removeprefix("torch.")
    return None


def json_safe(value: Any) -> Any:
    """A config dict as JSON values (transformers may keep a torch.dtype or a tuple in it)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value).removeprefix("torch.")
