"""How the ranks of a data-parallel job share the model: the plan request's `parallelism`.

Pure pydantic, no torch. Each strategy changes what one rank holds:
- `none`: no wrapper: each rank (or the one process) holds the whole model and its gradients;
- `ddp` (`DistributedDataParallel`): the whole model on every rank, plus the reducer's gradient
  buckets, another copy of the gradients unless `gradient_as_bucket_view` makes the gradients
  views into the buckets;
- `fsdp` (FSDP2's `fully_shard` per block and at the root): parameters, gradients and optimizer
  state split across the ranks, plus the unsharded parameters of the blocks in flight; what one
  rank holds depends on the world size.

`probe_key` is what a probe's cached answer depends on: the strategy, its options and, for FSDP
only, the world size (a DDP rank holds the same at any world size).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from tuner.builtin_configs import refuse_bool_for_number

Strategy = Literal["none", "ddp", "fsdp"]
ParamDtype = Literal["fp32", "bf16", "fp16"]

DDP_OPTIONS = frozenset({"gradient_as_bucket_view", "bucket_cap_mb"})
FSDP_OPTIONS = frozenset({"reshard_after_forward", "param_dtype"})
DEFAULT_BUCKET_CAP_MB = 25.0
"""PyTorch's `DistributedDataParallel(bucket_cap_mb=None)` default."""
FIRST_BUCKET_MB = 1.0
"""DDP's first bucket is capped at 1 MiB (`dist._DEFAULT_FIRST_BUCKET_BYTES`), so that the first
all-reduce starts early."""


class ParallelismSpec(BaseModel):
    """The data-parallel strategy of the training job and the options that change memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy
    """`none`, `ddp` or `fsdp`."""
    gradient_as_bucket_view: bool = False
    """ddp: gradients are views into the reducer's buckets (no second copy); PyTorch's default
    is False."""
    bucket_cap_mb: float = Field(default=DEFAULT_BUCKET_CAP_MB, gt=0.0, le=4096.0)
    """ddp: the reducer's bucket size in MiB (PyTorch's default 25)."""
    reshard_after_forward: bool = True
    """fsdp: free each block's unsharded parameters after its forward (re-gathered in backward);
    False keeps them from forward to backward (ZeRO-2-like)."""
    param_dtype: ParamDtype | None = None
    """fsdp: `MixedPrecisionPolicy(param_dtype=...)`, the dtype parameters are all-gathered in;
    None keeps the parameters' own dtype."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_for_number(cls, data: Any) -> Any:
        return refuse_bool_for_number(cls, data)

    @model_validator(mode="after")
    def _options_of_the_strategy(self) -> ParallelismSpec:
        allowed = {"none": frozenset(), "ddp": DDP_OPTIONS, "fsdp": FSDP_OPTIONS}[self.strategy]
        foreign = sorted((self.model_fields_set - {"strategy"}) - allowed)
        if foreign:
            owner = "ddp" if foreign[0] in DDP_OPTIONS else "fsdp"
            raise ValueError(
                f"parallelism.{foreign[0]} is a {owner} option; "
                f"it does not apply to strategy {self.strategy!r}"
            )
        return self

    @model_serializer(mode="wrap")
    def _only_this_strategys_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # What is dumped validates again: the other strategies' options are left out.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k == "strategy" or k in self.options()}

    def canonical(self) -> ParallelismSpec:
        """The same strategy with the other strategies' options at their defaults, so that equal
        jobs compare and fingerprint alike."""
        return ParallelismSpec.model_validate(self.options() | {"strategy": self.strategy})

    def options(self) -> dict[str, Any]:
        """The options of this strategy, defaults filled in."""
        if self.strategy == "ddp":
            return {
                "gradient_as_bucket_view": self.gradient_as_bucket_view,
                "bucket_cap_mb": self.bucket_cap_mb,
            }
        if self.strategy == "fsdp":
            return {"reshard_after_forward": self.reshard_after_forward, "param_dtype": self.param_dtype}
        return {}

    def probe_key(self, world_size: int) -> str:
        """The text a probe's cache key stores: '' for `none`, else the strategy and its options
        (and, for FSDP, the world size), e.g. `ddp:bucket_cap_mb=25,gradient_as_bucket_view=false`."""
        if self.strategy == "none":
            return ""
        options = self.options() | ({"world_size": world_size} if self.strategy == "fsdp" else {})
        return f"{self.strategy}:" + ",".join(f"{k}={_text(v)}" for k, v in sorted(options.items()))

    def describe(self, world_size: int) -> str:
        """A short human name: `none`, `DDP (25 MiB buckets, gradients copied)`, `FSDP × 8`."""
        if self.strategy == "ddp":
            grads = "gradients as bucket views" if self.gradient_as_bucket_view else "gradients copied"
            return f"DDP ({_text(self.bucket_cap_mb)} MiB buckets, {grads})"
        if self.strategy == "fsdp":
            extra = [] if self.reshard_after_forward else ["no reshard after forward"]
            extra += [f"{self.param_dtype} parameters"] if self.param_dtype else []
            return f"FSDP × {world_size}" + (f" ({', '.join(extra)})" if extra else "")
        return "none"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value is None else str(value)


def default_parallelism(world_size: int) -> ParallelismSpec:
    """DDP where there is more than one rank, else none (docs/contract.md)."""
    return ParallelismSpec(strategy="ddp" if world_size > 1 else "none")


NONE = ParallelismSpec(strategy="none")


def parse_probe_key(key: str) -> tuple[ParallelismSpec, int | None]:
    """The inverse of `ParallelismSpec.probe_key`: the spec and, for FSDP, the world size."""
    if not key:
        return NONE, None
    strategy, _, rest = key.partition(":")
    values: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        name, _, text = item.partition("=")
        values[name] = {"true": True, "false": False, "none": None}.get(text, text)
    world_size = values.pop("world_size", None)
    spec = ParallelismSpec.model_validate({"strategy": strategy, **values})
    return spec, int(world_size) if world_size is not None else None


class ParallelSetup(BaseModel):
    """One rank's view of the job: the strategy and how many ranks share the model. What a probe
    is asked for and what its result says it was traced or run under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parallelism: ParallelismSpec = NONE
    world_size: int = Field(default=1, ge=1, le=65_536)

    @property
    def probe_key(self) -> str:
        """`ParallelismSpec.probe_key` at this world size ('' for a single process)."""
        return self.parallelism.probe_key(self.world_size)

    def describe(self) -> str:
        return self.parallelism.describe(self.world_size)

    @classmethod
    def from_key(cls, key: str) -> ParallelSetup:
        """The setup a stored probe key names (a DDP key holds no world size: 1)."""
        spec, world_size = parse_probe_key(key)
        return cls(parallelism=spec, world_size=world_size or 1)


SINGLE = ParallelSetup()
"""One process, no data parallelism."""


def parse_parallelism_text(text: str) -> dict[str, Any]:
    """The `--parallelism` option's text as a `parallelism` dict: a strategy, optionally with
    options after a colon, e.g. `fsdp`, `ddp:gradient_as_bucket_view=true,bucket_cap_mb=50`,
    `fsdp:reshard_after_forward=false,param_dtype=bf16`. Raises `ValueError` on a malformed option."""
    strategy, _, rest = text.strip().partition(":")
    data: dict[str, Any] = {"strategy": strategy.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"option {item!r} should look like name=value")
        word = value.strip()
        data[name.strip()] = {"true": True, "false": False, "none": None}.get(word.lower(), word)
    return data
