"""`plan_for`: a training script asks for its plan at start-up (docs/training.md).

It turns what the script has (a `WorkloadSpec`, a transformers model, or any model with a
factory reference) into a workload spec, finds the local GPU and the world size, and asks the
tuner service (`server=` or `TUNER_SERVER`) or, with none, probes here and plans locally.

torch is imported only where it is needed (GPU and world-size detection, local probing); with a
spec, a device and a server given, nothing imports it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from tuner.checkpointing import on_off
from tuner.custom_code import (
    custom_code_workload,
    factory_package,
    is_custom_code,
    model_class,
    trusting_factory,
)
from tuner.errors import DeviceRequiredError, ModelBuildError, SpecError
from tuner.live_config import json_safe, parameter_dtype_name, without_implied_values
from tuner.parallelism import DEFAULT_BUCKET_CAP_MB, ParallelismSpec, ParamDtype, parse_parallelism_text
from tuner.plan_probes import ExtraProbes, ProbeNeed, all_needs, probed_workload
from tuner.results import Plan, ProbeResult
from tuner.search_types import DEFAULT_SEARCH, SearchConfig, Trial
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
    TokensInputs,
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
    "probe_locally",
    "probe_plan_locally",
    "search_for",
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
DEFAULT_MAX_WAIT = 3600.0
"""Seconds `plan_for` waits for a server's probe job in all before giving up (`job_timeout`)."""


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
    effective_tokens: int | None = None,
    parallelism: ParallelismSpec | Mapping[str, Any] | str | None = None,
    max_wait: float | None = DEFAULT_MAX_WAIT,
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
    `policy={"eval": True}` also plans an eval micro-batch; token `inputs` with a `min_seq_len`
    also plan a token budget, and `effective_tokens` how to reach that many tokens per update.

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
    may hold the request before the client polls the job. `max_wait`: seconds to wait for the
    job in all (None: however long it takes), then `ServiceError` (`job_timeout`) naming the job;
    while waiting, a bar on a terminal, else log lines (the `tuner` logger) and a warning once the
    job has waited a minute for a worker. `local`: probe here even when `TUNER_SERVER` is set.
    """
    chosen_parallelism = _parallelism_of(parallelism, model_or_spec)
    model = unwrapped(model_or_spec)  # a DDP wrapper's model is what is planned
    workload = workload_for(
        model,
        factory=factory,
        factory_kwargs=factory_kwargs,
        inputs=inputs,
        precision=precision,
        optimizer=optimizer,
        keeps_outputs=keeps_outputs,
    )
    package = factory_package(str(workload.model.factory)) if is_custom_code(model) else None
    with trusting_factory(package):  # the script imported the model's module: its own probes may too
        plan = _plan(
            workload,
            effective_batch_size=effective_batch_size,
            world_size=world_size,
            server=server,
            device=device,
            backend=backend,
            policy=policy,
            token=token,
            wait=wait,
            local=local,
            alloc_conf=alloc_conf,
            effective_tokens=effective_tokens,
            parallelism=chosen_parallelism,
            max_wait=max_wait,
        )
    if _length_defaulted(model, inputs, factory):
        assert isinstance(workload.inputs, TokensInputs)
        plan = plan.model_copy(
            update={
                "hints": [
                    *plan.hints,
                    f"Planned for {workload.inputs.seq_len} tokens per sample, the config's maximum "
                    "positions (no inputs= given): pass inputs=SEQ_LEN for the length your training "
                    "uses, which usually allows a larger micro-batch.",
                ]
            }
        )
    return plan


def _length_defaulted(model_or_spec: Any, inputs: Any, factory: str | None) -> bool:
    """Whether the sequence length came from a transformers config's maximum positions."""
    return (
        inputs is None
        and factory is None
        and not isinstance(model_or_spec, WorkloadSpec | Mapping)
        and not is_custom_code(model_or_spec)
    )


def _plan(
    workload: WorkloadSpec,
    *,
    effective_batch_size: int,
    world_size: int | None,
    server: str | None,
    device: DeviceSpec | None,
    backend: Backend | None,
    policy: PlanPolicy | Mapping[str, Any] | None,
    token: str | None,
    wait: float,
    local: bool,
    alloc_conf: str | None,
    effective_tokens: int | None,
    parallelism: ParallelismSpec | None,
    max_wait: float | None,
) -> Plan:
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
        effective_tokens=effective_tokens,
        parallelism=parallelism,
    )
    if url:
        from tuner.client import TunerClient

        settings_token = get_settings().api_token
        bearer = token or (settings_token.get_secret_value() if settings_token else None)
        from tuner.job_log import JobLog

        with TunerClient(url, token=bearer) as client:
            log = JobLog(workload.describe(), url=url)
            return client.create_plan(request, wait=wait, max_seconds=max_wait, on_update=log)
    return plan_locally(request)


def search_for(
    request: PlanRequest, need: ProbeNeed | None = None, search: SearchConfig = DEFAULT_SEARCH
) -> SearchConfig:
    """The search a local probe for `request` runs: `search`, up to the caller's cap
    (`policy.max_micro_batch_size`) for a train probe (the plan's own, `need` None or of role
    `train`): no plan can use more, so searching beyond it is wasted. The eval probe and a token
    budget's shorter lengths are not bound by the training micro-batch's cap (an eval batch is
    usually larger; a short length's largest batch sets the token budget), so they search the
    full range. A server's worker never caps: its probe is shared by every request."""
    cap = request.policy.max_micro_batch_size
    if cap is None or (need is not None and need.role != "train"):
        return search
    return replace(search, max_batch_size=cap)


def probe_locally(
    request: PlanRequest,
    need: ProbeNeed | bool,
    *,
    progress: Callable[[Trial], None] | None = None,
    search: SearchConfig = DEFAULT_SEARCH,
) -> ProbeResult:
    """One probe `request` needs, run in this machine as `search_for` says (`search` capped by
    the plan's policy): what `plan_locally` and `tuner plan` (without `--server`) both run.
    `need`: one of the request's probes (`tuner.plan_probes`), or a checkpointing choice for the
    train probe of that choice."""
    from probes.probe import run_probe

    if isinstance(need, bool):
        need = ProbeNeed(probed_workload(request.workload), need)
    settings = get_settings()
    return run_probe(
        need.workload,
        backend=request.backend,
        device=request.device,
        gradient_checkpointing=need.gradient_checkpointing,
        search=search_for(request, need, search),
        timeout=settings.probe_timeout_seconds,
        prior_timeout=settings.estimate_timeout_seconds,
        progress=progress,
        alloc_conf=request.alloc_conf,
        step=need.step,
        # The plan's allocator hint comes from its train probes at seq_len.
        allocator_hint=need.role == "train",
        parallel=request.parallel_setup(),
    )


ProgressFor = Callable[[ProbeNeed], AbstractContextManager[Any]]
"""A context per probe that yields an object with `advance(trial)` and `done(result)`."""


class _Silent:
    def advance(self, _trial: Trial) -> None:
        pass

    def done(self, _result: ProbeResult) -> None:
        pass


@contextmanager
def _silent(_need: ProbeNeed) -> Iterator[_Silent]:
    yield _Silent()


def probe_plan_locally(
    request: PlanRequest,
    *,
    progress_for: ProgressFor | None = None,
    search: SearchConfig = DEFAULT_SEARCH,
    drop_unbuildable: bool = False,
) -> tuple[dict[bool, ProbeResult], ExtraProbes, list[str]]:
    """Every probe `request` needs, one after the other (`probe_locally`, each searching as
    `search` says): the train probe of
    each checkpointing choice, then the eval probe and a token budget's lengths
    (`tuner.plan_probes`). Returns the train probes, the extra probes and the hints of what was
    dropped: with `drop_unbuildable` under `auto`, a checkpointing choice the model cannot be
    built with is one choice less (its length probes skipped too), not no plan."""
    policy = request.policy.gradient_checkpointing
    probes: dict[bool, ProbeResult] = {}
    extras = ExtraProbes()
    dropped: list[str] = []
    unbuildable: set[bool] = set()
    for need in all_needs(request):
        if need.role == "length" and need.gradient_checkpointing in unbuildable:
            continue
        with (progress_for or _silent)(need) as bar:
            try:
                result = probe_locally(request, need, progress=bar.advance, search=search)
            except ModelBuildError as exc:
                if not drop_unbuildable or policy != "auto" or need.role != "train" or not probes:
                    raise
                unbuildable.add(need.gradient_checkpointing)
                dropped.append(
                    f"Checkpointing {on_off(need.gradient_checkpointing)} was not considered: the model "
                    f"cannot be built with it ({exc.message})."
                )
                continue
            bar.done(result)
        if need.role == "train":
            probes[need.gradient_checkpointing] = result
        else:
            extras.add(need, result)
    return probes, extras, dropped


def plan_locally(request: PlanRequest) -> Plan:
    """Probe each checkpointing choice the policy needs in this machine (and the eval step and a
    token budget's lengths where the request asks for them), then plan (no server)."""
    from tuner.planner import make_plan

    probes, extras, dropped = probe_plan_locally(request, drop_unbuildable=True)
    plan = make_plan(request, probes, extras)
    return plan.model_copy(update={"hints": [*plan.hints, *dropped]}) if dropped else plan


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
        if is_custom_code(model_or_spec):
            return custom_code_workload(model_or_spec, overrides)
        return _transformers_workload(model_or_spec, config, overrides)
    raise SpecError(
        f"Cannot describe a {type(model_or_spec).__name__} as a workload: pass a WorkloadSpec, a "
        "transformers model, or the model with factory='package.module:function' that builds it."
    )


def _transformers_workload(model: Any, config: Any, overrides: dict[str, Any]) -> WorkloadSpec:
    config_dict = without_implied_values(config, json_safe(config.to_diff_dict()))
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
    if "precision" not in overrides and parameter_dtype_name(model) == "bfloat16":
        overrides["precision"] = "bf16"  # bf16 weights: no autocast, no fp32 master copy
    spec = {"model": {"family": "transformers", "config": config_dict, "task": _task_of(model)}, **overrides}
    return parse_workload(spec)


def _task_of(model: Any) -> Task:
    name = model_class(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    return "causal-lm"  # a bare backbone: plan for it with the LM head (the larger of the two)


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
    effective_tokens: int | None = None,
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
            effective_tokens=effective_tokens,
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
