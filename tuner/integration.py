"""`plan_for`: a training script asks for its plan at start-up (DESIGN.md §1).

It turns what the script has (a `WorkloadSpec`, a transformers model, or any model with a
factory reference) into a workload spec, finds the local GPU and the world size, and asks the
tuner service (`server=` or `TUNER_SERVER`) or, with none, probes here and plans locally.

torch is imported only where it is needed (GPU and world-size detection, local probing); with a
spec, a device and a server given, nothing imports it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from tuner.errors import DeviceRequiredError, SpecError
from tuner.parallelism import DEFAULT_BUCKET_CAP_MB, ParallelismSpec, ParamDtype, parse_parallelism_text
from tuner.results import Plan, ProbeResult
from tuner.settings import get_settings
from tuner.spec import (
    Backend,
    DeviceSpec,
    InputsSpec,
    OptimizerSpec,
    PlanPolicy,
    PlanRequest,
    Precision,
    Task,
    WorkloadSpec,
    format_validation_error,
    parse_workload,
)

__all__ = [
    "detect_local_device",
    "detect_parallelism",
    "detect_world_size",
    "plan_for",
    "plan_locally",
    "workload_for",
]

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_TASK_SUFFIXES: tuple[tuple[str, Task], ...] = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "seq-classification"),
)
DEFAULT_SERVER_WAIT = 30.0
"""Seconds the server may hold the plan request before answering with a job to poll."""


def plan_for(
    model_or_spec: Any,
    *,
    effective_batch_size: int,
    world_size: int | None = None,
    server: str | None = None,
    device: DeviceSpec | None = None,
    backend: Backend | None = None,
    policy: PlanPolicy | Mapping[str, Any] | None = None,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    inputs: InputsSpec | Mapping[str, Any] | int | None = None,
    precision: Precision | None = None,
    optimizer: OptimizerSpec | Mapping[str, Any] | str | None = None,
    token: str | None = None,
    wait: float = DEFAULT_SERVER_WAIT,
    local: bool = False,
    keeps_outputs: bool | None = None,
    alloc_conf: str | None = None,
    parallelism: ParallelismSpec | Mapping[str, Any] | str | None = None,
) -> Plan:
    """The plan for training `model_or_spec` at `effective_batch_size` samples per update.

    `model_or_spec`: a `WorkloadSpec` (or its dict), a transformers model (its config becomes the
    spec; `inputs` defaults to tokens at the config's maximum positions), or any model together
    with `factory="package.module:function"` (and `factory_kwargs`) that builds it again.
    `inputs`, `precision`, `optimizer` override the spec's (`inputs=2048` means tokens of 2048).
    `keeps_outputs`: whether the training loop keeps the model's output (the logits) alive through
    backward (`res = model(x, labels=y)`, as MiniMind's and nanoGPT's loops do: the default) or
    releases it before backward (`loss = model(...).loss`, as HF Trainer does: pass False, or use
    `tuner.integrations.hf.plan_for_trainer`).
    `alloc_conf`: the `PYTORCH_CUDA_ALLOC_CONF` the training will use (default: this process's
    environment variable); part of the probe's key.

    `world_size`: default `torch.distributed`'s when initialised, else `WORLD_SIZE`, else 1.
    `parallelism`: `none`, `ddp` or `fsdp` (or a `ParallelismSpec` or its dict, with options);
    default what the model already is (a `DistributedDataParallel` wrapper with its bucket size
    and `gradient_as_bucket_view`, an FSDP2 `fully_shard` module with its resharding and
    mixed-precision dtype), else `ddp` above one rank and `none` for one.
    `device`: default this process's CUDA GPU; without a GPU, give the device to plan for
    (`DeviceSpec(name=..., total_memory_bytes=...)`) and the plan is an estimate.
    `backend`: default `cuda` when planning for the local GPU, else `estimate`.
    `server`: the tuner service's URL (default `TUNER_SERVER`); with none, each checkpointing
    choice the policy needs is probed here and the plan is made locally.
    `token`: bearer token for the server (default `TUNER_API_TOKEN`). `wait`: seconds the server
    may hold the request before the client polls the job. `local`: probe here even when
    `TUNER_SERVER` is set.
    """
    chosen_parallelism = _parallelism_of(parallelism, model_or_spec)
    workload = workload_for(
        unwrapped(model_or_spec),
        factory=factory,
        factory_kwargs=factory_kwargs,
        inputs=inputs,
        precision=precision,
        optimizer=optimizer,
        keeps_outputs=keeps_outputs,
    )
    # With a device given, the local GPU only matters for choosing the backend, and only when
    # this process uses torch at all (a script that never imported it is planning ahead).
    look_here = device is None or (backend is None and "torch" in sys.modules)
    local_device = detect_local_device() if look_here else None
    target = device or local_device
    if backend is None:
        on_local_gpu = local_device is not None and (device is None or device.name == local_device.name)
        backend = "cuda" if on_local_gpu else "estimate"
    url = None if local else server or get_settings().server
    if target is None and (backend == "estimate" or not url):
        raise DeviceRequiredError(
            "No CUDA GPU is visible here: pass device=DeviceSpec(name=..., total_memory_bytes=...) "
            "to plan for a GPU by estimate, or run on the GPU you train on."
        )
    request = _plan_request(
        workload,
        effective_batch_size=effective_batch_size,
        world_size=world_size if world_size is not None else detect_world_size(),
        device=target,
        backend=backend,
        policy=policy,
        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if alloc_conf is None else alloc_conf,
        parallelism=chosen_parallelism,
    )
    if url:
        from tuner.client import TunerClient

        settings_token = get_settings().api_token
        bearer = token or (settings_token.get_secret_value() if settings_token else None)
        with TunerClient(url, token=bearer) as client:
            return client.create_plan(request, wait=wait)
    return plan_locally(request)


def plan_locally(request: PlanRequest) -> Plan:
    """Probe each checkpointing choice the policy needs in this machine, then plan (no server)."""
    from probes.probe import run_probe
    from tuner.planner import make_plan

    choices = {"off": (False,), "on": (True,), "auto": (False, True)}[request.policy.gradient_checkpointing]
    probes: dict[bool, ProbeResult] = {
        checkpointing: run_probe(
            request.workload,
            backend=request.backend,
            device=request.device,
            gradient_checkpointing=checkpointing,
            alloc_conf=request.alloc_conf,
            parallel=request.parallel_setup(),
        )
        for checkpointing in choices
    }
    return make_plan(request, probes)


# -- the workload --------------------------------------------------------------------------------


def workload_for(
    model_or_spec: Any,
    *,
    factory: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    inputs: InputsSpec | Mapping[str, Any] | int | None = None,
    precision: Precision | None = None,
    optimizer: OptimizerSpec | Mapping[str, Any] | str | None = None,
    keeps_outputs: bool | None = None,
) -> WorkloadSpec:
    """The workload spec of a spec, a transformers model, or a model with a factory reference."""
    overrides: dict[str, Any] = {}
    if keeps_outputs is not None:
        overrides["loop"] = {"keeps_outputs": keeps_outputs}
    if inputs is not None:
        overrides["inputs"] = _inputs_dict(inputs)
    if precision is not None:
        overrides["precision"] = precision
    if optimizer is not None:
        overrides["optimizer"] = _optimizer_dict(optimizer)

    if isinstance(model_or_spec, WorkloadSpec | Mapping) and factory is None:
        base = (
            model_or_spec.model_dump(mode="json")
            if isinstance(model_or_spec, WorkloadSpec)
            else model_or_spec
        )
        return parse_workload({**base, **overrides})
    if factory is not None:
        if "inputs" not in overrides:
            raise SpecError(
                "A model built by a factory needs inputs=, e.g. {'kind': 'tokens', 'seq_len': 2048}."
            )
        model = {"family": "python", "factory": factory, "kwargs": dict(factory_kwargs or {})}
        return parse_workload({"model": model, **overrides})
    config = getattr(model_or_spec, "config", None)
    if config is not None and callable(getattr(config, "to_diff_dict", None)):
        return _transformers_workload(model_or_spec, config, overrides)
    raise SpecError(
        f"Cannot describe a {type(model_or_spec).__name__} as a workload: pass a WorkloadSpec, a "
        "transformers model, or the model with factory='package.module:function' that builds it."
    )


def _transformers_workload(model: Any, config: Any, overrides: dict[str, Any]) -> WorkloadSpec:
    config_dict = _without_implied_values(config, _json_safe(config.to_diff_dict()))
    config_dict.setdefault("model_type", getattr(config, "model_type", None))
    if "inputs" not in overrides:
        seq_len = next((config_dict[k] for k in _POSITION_KEYS if isinstance(config_dict.get(k), int)), None)
        if seq_len is None:
            seq_len = next(
                (getattr(config, k) for k in _POSITION_KEYS if isinstance(getattr(config, k, None), int)),
                None,
            )
        if seq_len is None:
            raise SpecError(
                f"The {config_dict['model_type']} config names no maximum positions: pass "
                "inputs=SEQ_LEN (tokens per sample)."
            )
        overrides["inputs"] = {"kind": "tokens", "seq_len": seq_len}
    if "precision" not in overrides and _parameter_dtype_name(model) == "bfloat16":
        overrides["precision"] = "bf16"  # bf16 weights: no autocast, no fp32 master copy
    spec = {"model": {"family": "transformers", "config": config_dict, "task": _task_of(model)}, **overrides}
    return parse_workload(spec)


def _without_implied_values(config: Any, config_dict: dict[str, Any]) -> dict[str, Any]:
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
    values = _json_safe(config.to_dict())
    values.pop("transformers_version", None)
    return values


def _task_of(model: Any) -> Task:
    name = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return "causal-lm"  # a bare backbone: plan for it with the LM head (the larger of the two)


def _parameter_dtype_name(model: Any) -> str | None:
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    for parameter in parameters():
        return str(parameter.dtype).removeprefix("torch.")
    return None


def _json_safe(value: Any) -> Any:
    """A config dict as JSON values (transformers may keep a torch.dtype or a tuple in it)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value).removeprefix("torch.")


def _inputs_dict(inputs: InputsSpec | Mapping[str, Any] | int) -> dict[str, Any]:
    if isinstance(inputs, bool):
        raise SpecError(f"inputs must be a sequence length or an inputs spec, got {inputs!r}.")
    if isinstance(inputs, int):
        return {"kind": "tokens", "seq_len": inputs}
    if isinstance(inputs, Mapping):
        return dict(inputs)
    dumped: dict[str, Any] = inputs.model_dump(mode="json")
    return dumped


def _optimizer_dict(optimizer: OptimizerSpec | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(optimizer, str):
        return {"name": optimizer}
    if isinstance(optimizer, Mapping):
        return dict(optimizer)
    dumped: dict[str, Any] = optimizer.model_dump(mode="json")
    return dumped


def _plan_request(
    workload: WorkloadSpec,
    *,
    effective_batch_size: int,
    world_size: int,
    device: DeviceSpec | None,
    backend: Backend,
    policy: PlanPolicy | Mapping[str, Any] | None,
    alloc_conf: str | None = None,
    parallelism: ParallelismSpec | None = None,
) -> PlanRequest:
    try:
        return PlanRequest(
            parallelism=parallelism,
            workload=workload,
            effective_batch_size=effective_batch_size,
            world_size=world_size,
            device=device,
            backend=backend,
            policy=PlanPolicy.model_validate(policy if policy is not None else {}),
            alloc_conf=alloc_conf,
        )
    except ValidationError as exc:
        raise SpecError(f"Invalid plan request: {format_validation_error(exc)}") from None


# -- the machine ---------------------------------------------------------------------------------


def unwrapped(model: Any) -> Any:
    """The model inside a `DistributedDataParallel` wrapper (its `.module`); anything else as is
    (an FSDP2 module is the model itself, sharded in place)."""
    return model.module if _is_ddp(model) else model


def _is_ddp(model: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _parallelism_of(
    given: ParallelismSpec | Mapping[str, Any] | str | None, model: Any
) -> ParallelismSpec | None:
    if isinstance(given, ParallelismSpec):
        return given
    try:
        if isinstance(given, str):
            return ParallelismSpec.model_validate(parse_parallelism_text(given))
        if isinstance(given, Mapping):
            return ParallelismSpec.model_validate(dict(given))
    except ValidationError as exc:
        message = format_validation_error(exc)
        where = "" if message.startswith("parallelism.") else "parallelism."
        raise SpecError(f"Invalid plan request: {where}{message}") from None
    except ValueError as exc:
        raise SpecError(f"Invalid plan request: parallelism: {exc}") from None
    return detect_parallelism(model)


MIB = 1 << 20


def detect_parallelism(model: Any) -> ParallelismSpec | None:
    """The parallelism a model is already wrapped in: DDP (its bucket size and
    `gradient_as_bucket_view`) or FSDP2 (whether its blocks reshard after forward, the
    mixed-precision parameter dtype); None for a bare model (the request's default applies)."""
    if _is_ddp(model):
        cap = getattr(model, "bucket_bytes_cap", None)
        return ParallelismSpec(
            strategy="ddp",
            gradient_as_bucket_view=bool(getattr(model, "gradient_as_bucket_view", False)),
            bucket_cap_mb=cap / MIB if isinstance(cap, int) and cap > 0 else DEFAULT_BUCKET_CAP_MB,
        )
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing can be wrapped in it
        return None
    if not isinstance(model, FSDPModule):
        return None
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    return ParallelismSpec(
        strategy="fsdp",
        reshard_after_forward=_reshards_after_forward(blocks[0] if blocks else model),
        param_dtype=_param_dtype_name(model),
    )


def _fsdp_param_group(module: Any) -> Any:
    state = module._get_fsdp_state() if callable(getattr(module, "_get_fsdp_state", None)) else None
    return getattr(state, "_fsdp_param_group", None)


def _reshards_after_forward(module: Any) -> bool:
    group = _fsdp_param_group(module)
    if group is None:
        return True
    # FSDP2 keeps a mesh to reshard to after forward only where it reshards.
    return getattr(group, "post_forward_mesh_info", True) is not None


def _param_dtype_name(module: Any) -> ParamDtype | None:
    group = _fsdp_param_group(module)
    dtype = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
    names: dict[str, ParamDtype] = {
        "torch.float32": "fp32",
        "torch.bfloat16": "bf16",
        "torch.float16": "fp16",
    }
    return names.get(str(dtype)) if dtype is not None else None


def detect_world_size() -> int:
    """`torch.distributed`'s world size when a process group is up, else `WORLD_SIZE`, else 1."""
    torch = sys.modules.get("torch")  # not imported yet: no process group can exist
    if torch is not None:
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            return int(distributed.get_world_size())
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        raise SpecError(f"WORLD_SIZE must be a positive integer, got {raw!r}.") from None
    if value < 1:
        raise SpecError(f"WORLD_SIZE must be a positive integer, got {raw!r}.")
    return value


def detect_local_device() -> DeviceSpec | None:
    """This process's CUDA GPU (the current device) by name and total memory; None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return DeviceSpec(name=str(properties.name), total_memory_bytes=int(properties.total_memory))
