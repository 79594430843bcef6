"""Custom-code transformers models (`trust_remote_code` style): a `PreTrainedModel` subclass with a
config class of its own, whose `model_type` transformers does not know (MiniMind's
`MiniMindForCausalLM`, most models published with their own modelling file).

Such a model cannot be rebuilt from `AutoModelForCausalLM.from_config`; it is described as the
user built it, a `python` workload whose factory is the model class itself and whose `kwargs`
hold the config: `{"family": "python", "factory": "model.model_minimind:MiniMindForCausalLM",
"kwargs": {"config": {"hidden_size": 512, ...}}}`. `probes.workloads` builds it as
`Class(Class.config_class(**config))`, the same two lines the user's script runs.

In the user's own process the model's module is trusted (the script has imported it already):
`trusting_factory` lets the spec and the local probe children name it without the
`TUNER_ALLOWED_FACTORY_PACKAGES` setting. A server still decides by its own setting.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from tuner.errors import SpecError
from tuner.live_config import json_safe, parameter_dtype_name, without_implied_values
from tuner.settings import get_settings
from tuner.spec import WorkloadSpec, parse_workload

__all__ = ["custom_code_workload", "factory_package", "is_custom_code", "model_class", "trusting_factory"]

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
# What a saved config carries that does not change the model that is built.
_NOT_BUILD_KEYS = frozenset(
    {"model_type", "transformers_version", "architectures", "_name_or_path", "auto_map", "dtype"}
    | {"torch_dtype"}
)
_ALLOW_SETTING = "TUNER_ALLOWED_FACTORY_PACKAGES"
_TRUST_LOCK = threading.RLock()


def model_class(model: Any) -> type:
    """The class the user built `model` from. FSDP2's `fully_shard` swaps a module's class for a
    subclass it defines (`torch.distributed.fsdp...:FSDPGPT2LMHeadModel`, bases `FSDPModule` and
    the model's own class): that one is not the model's and builds nothing, so it is skipped."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls
    return type(model)


def is_custom_code(model: Any) -> bool:
    """Whether `model` is a transformers-style model that transformers itself cannot rebuild: its
    class is defined outside the transformers package, or its `model_type` is unknown to it."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if not model_class(model).__module__.startswith("transformers."):
        return True
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    from transformers import CONFIG_MAPPING

    return str(getattr(config, "model_type", "")) not in CONFIG_MAPPING


def factory_package(factory: str) -> str:
    """The top-level package of a `package.module:name` factory (what the allow-list names)."""
    return factory.split(":", 1)[0].split(".", 1)[0]


def custom_code_workload(model: Any, overrides: dict[str, Any]) -> WorkloadSpec:
    """The `python` workload that builds `model` again from its own class and config."""
    cls = model_class(model)
    name = cls.__name__
    if cls.__module__ == "__main__":
        raise SpecError(
            f"{name} is defined in the script being run (__main__), which a probe process cannot "
            "import without running the script again: move the model's classes into a module beside "
            "the script (as MiniMind keeps its model in model/model_minimind.py) and import them from there."
        )
    if "." in cls.__qualname__ or "<" in cls.__qualname__:
        raise SpecError(
            f"{cls.__qualname__} is not a module-level class: a probe process can only import a class "
            "defined at the top level of its module."
        )
    config = model.config
    if type(config) is not getattr(cls, "config_class", type(config)):
        raise SpecError(
            f"{name}.config is a {type(config).__name__}, not {name}.config_class: set "
            f"{name}.config_class = {type(config).__name__} so that the model can be built from its config."
        )
    config_dict = without_implied_values(config, json_safe(config.to_diff_dict()))
    config_dict = {k: v for k, v in config_dict.items() if k not in _NOT_BUILD_KEYS}
    if "inputs" not in overrides:
        limit = next(
            (getattr(config, k) for k in _POSITION_KEYS if isinstance(getattr(config, k, None), int)), None
        )
        length = f"its config allows up to {limit} positions" if limit else "its config names no length"
        raise SpecError(
            f"{name} is a custom-code model: pass inputs=SEQ_LEN, the tokens per sample your training "
            f"uses (MiniMind's --max_seq_len); {length}, and a plan for that would not be the plan of "
            "your run."
        )
    if "precision" not in overrides and parameter_dtype_name(model) == "bfloat16":
        overrides["precision"] = "bf16"
    factory = f"{cls.__module__}:{cls.__qualname__}"
    spec = {"model": {"family": "python", "factory": factory, "kwargs": {"config": config_dict}}, **overrides}
    with trusting_factory(factory_package(factory)):
        return parse_workload(spec)


@contextlib.contextmanager
def trusting_factory(package: str | None) -> Iterator[None]:
    """Within the block, this process (and the probe children it starts) accepts `python`
    factories of `package` as if `TUNER_ALLOWED_FACTORY_PACKAGES` listed it: for a model the
    script has imported already. The setting is restored on leaving. None: no change."""
    if package is None or package in get_settings().allowed_factory_package_set:
        yield
        return
    with _TRUST_LOCK:
        previous = os.environ.get(_ALLOW_SETTING)
        os.environ[_ALLOW_SETTING] = ",".join(p for p in (previous, package) if p)
        get_settings.cache_clear()
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(_ALLOW_SETTING, None)
            else:
                os.environ[_ALLOW_SETTING] = previous
            get_settings.cache_clear()
