"""Workload, device, policy and plan-request specs (docs/contract.md), and the workload fingerprint.

Pure pydantic: the API process validates specs without importing torch. What can only be
checked by building the model (an unknown `model_type`, a factory that raises) is found in
`probes/` and reported as `ModelBuildError`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tuner.alloc_conf import canonical_alloc_conf
from tuner.builtin_configs import BUILTIN_CONFIGS, BUILTIN_INPUTS, refuse_bool_for_number
from tuner.config_keys import check_keys, check_model_type, check_task
from tuner.errors import SpecError
from tuner.parallelism import ParallelismSpec, ParallelSetup, default_parallelism
from tuner.settings import get_settings
from tuner.transformers_config import canonical_config

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]
Backend = Literal["cuda", "estimate"]
StepKind = Literal["train", "eval"]
"""What a probe's step runs: the canonical train step, or the eval forward (`probes.step`)."""
CheckpointingPolicy = Literal["auto", "on", "off"]
Family = Literal["transformers", "torchvision", "builtin", "python"]
Task = Literal["causal-lm", "masked-lm", "seq-classification"]
MoeRouting = Literal["balanced", "hottest"]

MAX_SEQ_LEN = 131_072
MAX_DIM = 65_536
MAX_LAYERS = 512
MAX_VOCAB = 1_048_576
MAX_IMAGE_SIDE = 4096
MAX_CLASSES = 1_048_576
MAX_BATCH = 1 << 20

# transformers config keys whose size a server must bound, and the bound.
CONFIG_BOUNDS: dict[str, int] = {
    **dict.fromkeys(("n_layer", "num_hidden_layers", "num_layers", "n_layers", "decoder_layers"), MAX_LAYERS),
    **dict.fromkeys(("n_embd", "hidden_size", "d_model", "dim"), MAX_DIM),
    **dict.fromkeys(("n_inner", "intermediate_size", "ffn_dim", "d_ff"), 4 * MAX_DIM),
    **dict.fromkeys(("n_head", "num_attention_heads", "num_key_value_heads"), 1024),
    **dict.fromkeys(("vocab_size",), MAX_VOCAB),
    **dict.fromkeys(("n_positions", "max_position_embeddings", "n_ctx"), MAX_SEQ_LEN),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 1024),
}
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
"""Config keys naming a model's maximum positions: a `seq_len` beyond one that is given is refused
(learned position tables cannot take it; rotary models could, but the config says otherwise)."""
# Keys that do not change the model that is built; dropped before fingerprinting.
_CONFIG_IRRELEVANT = frozenset({"transformers_version", "_name_or_path", "architectures"})
_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_CONFIG_MAX_BYTES = 64_000


INTAKE: dict[str, Any] = {"intake": True}
"""Validation context of what a user sends (`parse_workload`, `parse_plan_request`): a
transformers config is then also checked against what transformers knows (`tuner.config_keys`).
Stored rows are read without it, so that what was accepted once stays readable."""


def at_intake(info: ValidationInfo) -> bool:
    """Whether this validation checks a user's input (the `INTAKE` context)."""
    return bool(info.context and info.context.get("intake"))


def refuse_nul_characters(data: Any, path: str = "") -> Any:
    """A before-validator: no string (or key) anywhere in `data` may hold a NUL character.
    PostgreSQL text cannot store one, and no model, device or version name needs it."""
    if isinstance(data, str):
        if "\x00" in data:
            raise ValueError(f"{path or 'value'} must not contain NUL characters")
    elif isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            refuse_nul_characters(key, where)
            refuse_nul_characters(value, where)
    elif isinstance(data, list | tuple):
        for index, item in enumerate(data):
            refuse_nul_characters(item, f"{path}[{index}]")
    return data


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_for_number(cls, data: Any) -> Any:
        return refuse_bool_for_number(cls, refuse_nul_characters(data))


class ModelSpec(_Spec):
    """Which model to build. Fields other than `family` apply to some families only."""

    family: Family
    """`transformers`, `torchvision`, `builtin` or `python` (docs/contract.md)."""
    config: dict[str, Any] | None = None
    """transformers: a config dict with `model_type`; passed to `AutoConfig.for_model`."""
    task: Task = "causal-lm"
    """transformers: which head to build."""
    name: str | None = Field(default=None, min_length=1, max_length=100)
    """torchvision and builtin: the model's name (`resnet50`, `decoder`)."""
    factory: str | None = Field(default=None, max_length=200)
    """python: `package.module:function` returning an `nn.Module`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """torchvision, builtin and python: keyword arguments of the builder."""

    @field_validator("config")
    @classmethod
    def _check_config(cls, config: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if config is None:
            return None
        if not isinstance(config.get("model_type"), str) or not config["model_type"]:
            raise ValueError('needs a \'model_type\' string, e.g. {"model_type": "gpt2"}')
        if at_intake(info):
            check_model_type(config["model_type"])
            check_keys(config)
        if len(json.dumps(config, default=str)) > _CONFIG_MAX_BYTES:
            raise ValueError(f"is larger than {_CONFIG_MAX_BYTES} bytes of JSON")
        for key, bound in CONFIG_BOUNDS.items():
            value = config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            if not 1 <= value <= bound:
                raise ValueError(f"{key} must be between 1 and {bound}, got {value}")
        relevant = {k: v for k, v in config.items() if k not in _CONFIG_IRRELEVANT}
        # Aliases renamed and defaults filled in, so that explicit and implied values fingerprint alike.
        return canonical_config(relevant)

    @field_validator("kwargs")
    @classmethod
    def _check_kwargs_size(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(kwargs, default=str)) > _CONFIG_MAX_BYTES:
            raise ValueError(f"is larger than {_CONFIG_MAX_BYTES} bytes of JSON")
        return kwargs

    @model_validator(mode="after")
    def _check_family(self, info: ValidationInfo) -> ModelSpec:
        if self.family == "transformers":
            if self.config is None:
                raise ValueError(
                    'model.config is required for family \'transformers\' (e.g. {"model_type": "gpt2"})'
                )
            if at_intake(info):
                check_task(str(self.config["model_type"]), self.task)
        elif self.family == "torchvision":
            if self.name is None:
                raise ValueError("model.name is required for family 'torchvision' (e.g. 'resnet50')")
        elif self.family == "builtin":
            if self.name not in BUILTIN_CONFIGS:
                raise ValueError(
                    f"model.name must be one of {sorted(BUILTIN_CONFIGS)} for family 'builtin', "
                    f"got {self.name!r}"
                )
            try:
                filled = BUILTIN_CONFIGS[self.name].model_validate(self.kwargs)
            except ValidationError as exc:
                raise ValueError(
                    f"model.kwargs for builtin {self.name!r}: {format_validation_error(exc)}"
                ) from None
            # Defaults filled in so that explicit and implied values fingerprint alike.
            object.__setattr__(self, "kwargs", filled.model_dump(mode="json"))
        elif self.family == "python":
            _check_factory(self.factory)
        return self


def _check_factory(factory: str | None) -> None:
    # Only the reference's shape: which packages may be imported is the checking process's own
    # setting, checked at intake (`refuse_unlisted_factory`), so that a stored spec validates
    # wherever it is read.
    if factory is None or not _FACTORY.match(factory):
        raise ValueError("model.factory must look like 'package.module:function' for family 'python'")


def refuse_unlisted_factory(
    workload: WorkloadSpec, allowed: Collection[str], *, field: str = "model"
) -> None:
    """Raise `SpecError` when the workload's `python` factory is in a package not in `allowed`
    (the `TUNER_ALLOWED_FACTORY_PACKAGES` of the process taking the spec in)."""
    factory = workload.model.factory
    if workload.model.family != "python" or factory is None:
        return
    package = factory.split(":", 1)[0].split(".", 1)[0]
    if package not in allowed:
        raise SpecError(
            f"{field}.factory: package {package!r} is not allowed on this server; "
            "list it in the TUNER_ALLOWED_FACTORY_PACKAGES setting (comma-separated) to allow it."
        )


class TokensInputs(_Spec):
    """Token sequences; labels are the inputs, the loss runs over all tokens."""

    kind: Literal["tokens"]
    seq_len: int = Field(ge=1, le=MAX_SEQ_LEN)
    """Tokens per sample (the longest sample, where lengths vary)."""
    min_seq_len: int | None = Field(default=None, ge=1, le=MAX_SEQ_LEN)
    """Where lengths vary: the shortest sample. The plan then also gives a token budget per
    micro-batch (`tuner.token_budget`). Not part of the fingerprint: the probe at `seq_len` is
    the same whatever the shortest sample is."""

    @model_validator(mode="after")
    def _check_length_range(self) -> TokensInputs:
        if self.min_seq_len is not None and self.min_seq_len > self.seq_len:
            raise ValueError(f"min_seq_len ({self.min_seq_len}) must not exceed seq_len ({self.seq_len})")
        return self


class ImageInputs(_Spec):
    """Images with class labels."""

    kind: Literal["image"]
    channels: int = Field(default=3, ge=1, le=64)
    height: int = Field(default=224, ge=1, le=MAX_IMAGE_SIDE)
    width: int = Field(default=224, ge=1, le=MAX_IMAGE_SIDE)
    num_classes: int = Field(default=1000, ge=1, le=MAX_CLASSES)


class FeaturesInputs(_Spec):
    """Feature vectors with class labels."""

    kind: Literal["features"]
    dim: int = Field(ge=1, le=1 << 20)
    num_classes: int = Field(default=10, ge=1, le=MAX_CLASSES)


InputsSpec = Annotated[TokensInputs | ImageInputs | FeaturesInputs, Field(discriminator="kind")]


class OptimizerSpec(_Spec):
    """The optimizer whose state the plan must make room for."""

    name: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    implementation: Literal["foreach", "fused", "for-loop"] = "foreach"


class LoopSpec(_Spec):
    """The shape of the training loop, where it changes memory."""

    keeps_outputs: bool = True
    """Whether the loop keeps the forward's output (the logits) alive through backward and the
    optimizer step, as MiniMind's and nanoGPT's loops do (`res = model(x, labels=y)`, released
    after the step); `false` releases it before backward, as HF Trainer's `compute_loss` does.
    Holding GPT-2's bf16 logits costs 2 × seq_len × vocab bytes per sample."""


class WorkloadSpec(_Spec):
    """What is trained: model, inputs, precision, optimizer and the loop's shape. Its fingerprint
    keys the cache."""

    model: ModelSpec
    inputs: InputsSpec
    precision: Precision = "bf16-mixed"
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    loop: LoopSpec = Field(default_factory=LoopSpec)
    moe_routing: MoeRouting = "balanced"
    """How an estimate splits the tokens of a MoE layer among its experts, a value the trace
    cannot see: `balanced` (each expert k/E of the tokens) or `hottest` (k experts take every
    token: the worst case). Part of the fingerprint only when not the default, so that every
    workload without MoE keeps its fingerprint."""

    @model_validator(mode="after")
    def _check_inputs_match_model(self) -> WorkloadSpec:
        expected: str | None = None
        if self.model.family == "transformers":
            expected = "tokens"
        elif self.model.family == "torchvision":
            expected = "image"
        elif self.model.family == "builtin" and self.model.name:
            expected = BUILTIN_INPUTS[self.model.name]
        if expected is not None and self.inputs.kind != expected:
            raise ValueError(f"inputs.kind must be {expected!r} for this model, got {self.inputs.kind!r}")
        if isinstance(self.inputs, TokensInputs):
            limit = _position_limit(self.model)
            if limit is not None and self.inputs.seq_len > limit:
                raise ValueError(
                    f"inputs.seq_len ({self.inputs.seq_len}) exceeds the model's maximum positions ({limit})"
                )
        return self

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace, defaults filled in: the text the fingerprint hashes.
        `inputs.min_seq_len` is left out: it changes the plan (a token budget), not the step at
        `seq_len` that a probe runs."""
        data = self.model_dump(mode="json")
        data["inputs"].pop("min_seq_len", None)
        if data["moe_routing"] == "balanced":
            del data["moe_routing"]  # the default: fingerprints from before the field stay the same
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def at_length(self, seq_len: int) -> WorkloadSpec:
        """This workload with every sample `seq_len` tokens long (no length range): what a probe
        of one length of a token budget runs."""
        if not isinstance(self.inputs, TokensInputs):
            raise SpecError("inputs: only token inputs have a sequence length.")
        inputs = self.inputs.model_copy(update={"seq_len": seq_len, "min_seq_len": None})
        return self.model_copy(update={"inputs": inputs})

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON: equal for specs that build the same workload."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def describe(self) -> str:
        """A short human name: `gpt2`, `builtin decoder`, `resnet50`."""
        if self.model.family == "transformers" and self.model.config:
            return str(self.model.config["model_type"])
        if self.model.family == "python":
            return str(self.model.factory)
        return str(self.model.name)


def _position_limit(model: ModelSpec) -> int | None:
    if model.family == "transformers" and model.config:
        for key in POSITION_KEYS:
            if isinstance(model.config.get(key), int):
                return int(model.config[key])
    if model.family == "builtin" and model.name == "decoder":
        return int(model.kwargs["max_seq_len"])
    return None


class DeviceSpec(_Spec):
    """A GPU by name and total memory (as `torch.cuda.get_device_properties` reports them)."""

    name: str = Field(min_length=1, max_length=200)
    total_memory_bytes: int = Field(ge=1 << 20, le=1 << 44)


class RampSpec(_Spec):
    """Grow the effective batch linearly over the first steps, at a fixed micro-batch."""

    start_effective_batch_size: int = Field(ge=1, le=MAX_BATCH)
    ramp_steps: int = Field(ge=1, le=10_000_000)


class PlanPolicy(_Spec):
    """How the plan is chosen."""

    gradient_checkpointing: CheckpointingPolicy = "auto"
    memory_margin: float = Field(default=0.05, ge=0.0, le=0.5)
    """Fraction of the device's memory kept free."""
    max_micro_batch_size: int | None = Field(default=None, ge=1, le=MAX_BATCH)
    """An upper bound the caller imposes on the micro-batch."""
    allow_uneven_micro_batches: bool = False
    """Allow micro-batches of different sizes when no divisor fits well."""
    ramp: RampSpec | None = None
    """An optional batch-size ramp, returned as an accumulation schedule."""
    eval: bool = False
    """Also plan an eval micro-batch: the largest forward-only batch under `torch.no_grad()`
    with the model in eval mode and the training state (parameters, optimizer state) resident."""


class PlanRequest(_Spec):
    """`POST /v1/plans`: a workload and what the plan must reach."""

    workload: WorkloadSpec
    effective_batch_size: int = Field(ge=1, le=MAX_BATCH)
    world_size: int = Field(default=1, ge=1, le=65_536)
    device: DeviceSpec | None = None
    backend: Backend = "cuda"
    policy: PlanPolicy = Field(default_factory=PlanPolicy)
    alloc_conf: str | None = Field(default=None, max_length=500)
    """The `PYTORCH_CUDA_ALLOC_CONF` the run will use (e.g. `expandable_segments:True`); None is
    PyTorch's default allocator. Part of the probe's key; kept in canonical form."""
    effective_tokens: int | None = Field(default=None, ge=1, le=MAX_BATCH * MAX_SEQ_LEN)
    """Token inputs: the tokens per optimizer step (all ranks) a token-budget loop should reach;
    the plan says how many micro-batches of its token budget make it."""
    parallelism: ParallelismSpec | None = None
    """How the ranks share the model (`tuner.parallelism`); None: `ddp` when `world_size > 1`,
    else `none`. Filled in and kept in canonical form."""

    @field_validator("alloc_conf")
    @classmethod
    def _canonical_alloc_conf(cls, value: str | None) -> str | None:
        return validated_alloc_conf(value)

    @model_validator(mode="after")
    def _check_effective_tokens(self) -> PlanRequest:
        if self.effective_tokens is None:
            return self
        inputs = self.workload.inputs
        if not isinstance(inputs, TokensInputs):
            raise ValueError(
                f"effective_tokens needs token inputs (workload.inputs.kind 'tokens'), got {inputs.kind!r}"
            )
        if inputs.min_seq_len is None:
            raise ValueError(
                "effective_tokens needs workload.inputs.min_seq_len: a token budget is planned for "
                "lengths that vary"
            )
        from tuner.token_budget import check_effective_tokens

        check_effective_tokens(self.effective_tokens, self.world_size, seq_len=inputs.seq_len)
        return self

    @model_validator(mode="after")
    def _fill_parallelism(self) -> PlanRequest:
        chosen = self.parallelism or default_parallelism(self.world_size)
        object.__setattr__(self, "parallelism", chosen.canonical())
        if chosen.strategy == "fsdp" and not fsdp_wrappable(self.workload.model):
            raise ValueError(
                f"parallelism.strategy: 'fsdp' needs a model of repeated blocks to shard one by one; "
                f"{self.workload.model.family} models are not wrapped per block (use 'ddp')"
            )
        return self

    @property
    def chosen_parallelism(self) -> ParallelismSpec:
        """The parallelism, filled in (never None after validation)."""
        return self.parallelism or default_parallelism(self.world_size)

    def parallel_setup(self) -> ParallelSetup:
        """What one rank of this job is (strategy and world size): what its probe traces or runs."""
        return ParallelSetup(parallelism=self.chosen_parallelism, world_size=self.world_size)


FSDP_FAMILIES = frozenset({"transformers", "builtin", "python"})
"""Families whose models FSDP2 wraps per block: transformers' decoder/encoder layers, the
builtin models' `blocks`, and a python factory's model that has either (checked when built).
torchvision's models are a handful of unequal stages, not blocks to shard one by one."""


def fsdp_wrappable(model: ModelSpec) -> bool:
    """Whether `fully_shard` per block can wrap this family's models."""
    return model.family in FSDP_FAMILIES


def validated_alloc_conf(value: str | None) -> str | None:
    """A pydantic validator's view of `tuner.alloc_conf.canonical_alloc_conf`: a bad setting is a
    `ValueError` naming the option."""
    try:
        return canonical_alloc_conf(value)
    except SpecError as exc:
        raise ValueError(exc.message.removeprefix("alloc_conf: ")) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field: `inputs.seq_len: Input should be ≥ 1`."""
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"] if p not in _UNION_TAGS]
        message = str(error["msg"]).removeprefix("Value error, ")
        path = ".".join(loc)
        # Model-level checks already name their field ("model.kwargs ..."): do not repeat it.
        parts.append(message if not path or message.startswith(path + ".") else f"{path}: {message}")
    return "; ".join(parts)


_UNION_TAGS = frozenset({"tokens", "image", "features"})


def _parse(model: type[_Spec], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data, context=INTAKE)
    except ValidationError as exc:
        raise SpecError(f"Invalid {what}: {format_validation_error(exc)}") from None


def _allowed(allowed_factory_packages: Collection[str] | None) -> Collection[str]:
    # The caller's own setting where it passes one (the API passes the app's); else this process's.
    if allowed_factory_packages is not None:
        return allowed_factory_packages
    return get_settings().allowed_factory_package_set


def parse_workload(data: Any, *, allowed_factory_packages: Collection[str] | None = None) -> WorkloadSpec:
    """Validate a workload dict taken in from a user; raise `SpecError` naming every bad field,
    and for a `python` factory outside `allowed_factory_packages` (default: this process's
    `TUNER_ALLOWED_FACTORY_PACKAGES`)."""
    result: WorkloadSpec = _parse(WorkloadSpec, data, "workload spec")
    refuse_unlisted_factory(result, _allowed(allowed_factory_packages))
    return result


def parse_plan_request(data: Any, *, allowed_factory_packages: Collection[str] | None = None) -> PlanRequest:
    """Validate a plan request dict taken in from a user; raise `SpecError` naming every bad
    field (and an unlisted factory, as `parse_workload`)."""
    result: PlanRequest = _parse(PlanRequest, data, "plan request")
    refuse_unlisted_factory(result.workload, _allowed(allowed_factory_packages), field="workload.model")
    return result


def load_workload_file(path: str) -> WorkloadSpec:
    """Read and validate a workload spec JSON file (the CLI's SPEC.json)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise SpecError(f"Cannot read spec file {path!r}: {exc.strerror}.") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"Spec file {path!r} is not valid JSON: {exc.msg} at line {exc.lineno}.") from None
    return parse_workload(data)
