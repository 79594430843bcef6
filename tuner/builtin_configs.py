"""Configurations of the builtin model family (`mlp`, `cnn`, `decoder`).

They live here, free of torch, so that the API process validates them and fills in their
defaults (which the fingerprint needs); `probes/builtin_models.py` builds the modules.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_DIM = Field(ge=1, le=65_536)


def refuse_bool_for_number(model: type[BaseModel], data: Any) -> Any:
    """A before-validator of a whole model: pydantic's lax mode reads `true` as the integer 1,
    which would let `"seq_len": true` through; a boolean is accepted only where a field may be one.
    (A model validator rather than a field one: pydantic forbids those on union discriminators.)"""
    if not isinstance(data, dict):
        return data
    bad = [
        name
        for name, value in data.items()
        if isinstance(value, bool)
        and name in model.model_fields
        and not _admits_bool(model.model_fields[name].annotation)
    ]
    if bad:
        raise ValueError(f"{bad[0]} must be a number, not the boolean {str(data[bad[0]]).lower()}")
    return data


def _admits_bool(annotation: Any) -> bool:
    """Whether a field of this type may hold a boolean: anything but int, float and their optionals."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_bool(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation not in (int, float)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_bool_for_number(cls, data: Any) -> Any:
        return refuse_bool_for_number(cls, data)


class MLPConfig(_Config):
    """A plain multilayer perceptron over `features` inputs."""

    hidden_dim: int = Field(default=1024, ge=1, le=65_536)
    """Width of every hidden layer."""
    num_layers: int = Field(default=4, ge=1, le=512)
    """Number of hidden layers."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout after each hidden activation."""


class CNNConfig(_Config):
    """A small ResNet-like CNN with BatchNorm over `image` inputs."""

    base_channels: int = Field(default=32, ge=1, le=4096)
    """Channels of the first stage; each later stage doubles them."""
    num_stages: int = Field(default=3, ge=1, le=8)
    """Stages, each halving the resolution."""
    blocks_per_stage: int = Field(default=2, ge=1, le=64)
    """Residual blocks per stage."""
    norm: Literal["batch", "group", "layer"] = "batch"
    """BatchNorm (the default, which the planner warns about), GroupNorm, or GroupNorm(1) as LayerNorm."""


class DecoderConfig(_Config):
    """A compact pre-norm decoder: RMSNorm, rotary or learned positions, grouped-query attention
    through SDPA, and optional mixture-of-experts feed-forward layers with a load-balancing loss."""

    vocab_size: int = Field(default=6400, ge=2, le=1_048_576)
    """Vocabulary size."""
    hidden_size: int = Field(default=512, ge=1, le=65_536)
    """Model width."""
    num_layers: int = Field(default=8, ge=1, le=512)
    """Decoder blocks."""
    num_heads: int = Field(default=8, ge=1, le=1024)
    """Query heads."""
    num_kv_heads: int | None = Field(default=2, ge=1, le=1024)
    """Key/value heads (grouped-query attention); None means as many as query heads."""
    intermediate_size: int | None = Field(default=None, ge=1, le=262_144)
    """Feed-forward width; None means 8/3 × hidden rounded up to a multiple of 64."""
    max_seq_len: int = Field(default=2048, ge=1, le=131_072)
    """Longest sequence (learned positions are allocated for it)."""
    positions: Literal["rope", "learned"] = "rope"
    """Rotary position embedding or a learned position table."""
    rope_theta: float = Field(default=1_000_000.0, gt=0)
    """Rotary base."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual paths."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    use_moe: bool = False
    """Replace every feed-forward layer by a mixture of experts."""
    num_experts: int = Field(default=4, ge=1, le=256)
    """Routed experts per MoE layer."""
    experts_per_token: int = Field(default=2, ge=1, le=256)
    """Experts each token is routed to."""
    num_shared_experts: int = Field(default=1, ge=0, le=16)
    """Experts every token passes through as well."""
    aux_loss_coef: float = Field(default=0.01, ge=0.0, le=10.0)
    """Weight of the load-balancing auxiliary loss."""
    moe_capacity_factor: float = Field(default=1.25, gt=0.0, le=256.0)
    """Tokens each expert processes, as a multiple of its even share (tokens × experts_per_token /
    num_experts); assignments beyond it are dropped (Switch/GShard). Fixed per-expert buffers keep
    the memory independent of the routing, so a fake-tensor trace and a GPU run agree; a factor
    of num_experts / experts_per_token drops nothing."""

    @model_validator(mode="after")
    def _check_shapes(self) -> DecoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        if self.use_moe and self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must not exceed "
                f"num_experts ({self.num_experts})"
            )
        return self


BUILTIN_CONFIGS: dict[str, type[_Config]] = {
    "mlp": MLPConfig,
    "cnn": CNNConfig,
    "decoder": DecoderConfig,
}
"""Builtin model name → its configuration class."""

BUILTIN_INPUTS: dict[str, str] = {"mlp": "features", "cnn": "image", "decoder": "tokens"}
"""Builtin model name → the `inputs.kind` it takes."""
