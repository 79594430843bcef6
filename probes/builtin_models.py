"""The builtin model family: `mlp`, `cnn` and `decoder`, built from `tuner.builtin_configs`.

Every model keeps its repeated blocks in `self.blocks` and runs each through
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` when `gradient_checkpointing` is on,
so that checkpointing is a switch, not a different model.

The decoder's mixture-of-experts layer routes with fixed-capacity, index-based dispatch
(Switch/GShard style) rather than MiniMind's boolean-mask loop, and rather than running every
expert densely on every token:

- MiniMind's `x[flat_topk_idx == i]` is data-dependent (the row count depends on the routing),
  which fails under `FakeTensorMode`, so the estimator could not trace it.
- Running all experts densely, weighted by a gate matrix that is zero off the top-k, traces fine
  but holds `num_experts / experts_per_token` times the feed-forward activations of a sparse
  model, so an estimate would over-predict memory (2× for MiniMind's 4 experts, top-2).
- Fixed capacity gives each expert a buffer of `capacity_factor × tokens × k / experts` rows,
  filled with `scatter`/`index_add` by index. Shapes depend only on the batch, never on the
  routing: the fake-tensor trace and a GPU run allocate the same bytes, the memory is that of a
  sparse model (times the capacity factor), and the boundary the tuner probes does not move with
  the routing. The price is that assignments beyond an expert's capacity are dropped (their
  tokens keep the residual path and the shared experts), as in Switch Transformer; a capacity
  factor of `num_experts / experts_per_token` drops nothing.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuner.builtin_configs import BUILTIN_CONFIGS, CNNConfig, DecoderConfig, MLPConfig
from tuner.errors import ModelBuildError
from tuner.spec import FeaturesInputs, ImageInputs, TokensInputs, format_validation_error

_INIT_STD = 0.02


class BlockModel(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """A model whose `blocks` may each be recomputed in the backward pass (gradient checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# ---------------------------------------------------------------------------------------- mlp


class MLP(BlockModel):
    """`num_layers` hidden layers (Linear → GELU → Dropout), then a classifier."""

    def __init__(self, config: MLPConfig, in_features: int, num_classes: int) -> None:
        super().__init__()
        widths = [in_features] + [config.hidden_dim] * config.num_layers
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(fan_in, fan_out), nn.GELU(), nn.Dropout(config.dropout))
            for fan_in, fan_out in itertools.pairwise(widths)
        )
        self.head = nn.Linear(config.hidden_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features
        for block in self.blocks:
            hidden = self.run_block(block, hidden)
        logits: torch.Tensor = self.head(hidden)
        return logits


# ---------------------------------------------------------------------------------------- cnn


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.GroupNorm(1, channels)  # one group over (C, H, W): LayerNorm for images


class ResidualBlock(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """ResNet's basic block: two 3×3 convolutions with a (projected when needed) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm2d(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm2d(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CNN(BlockModel):
    """A stem, `num_stages` stages of residual blocks (each stage halves the resolution and
    doubles the channels), global average pooling and a classifier."""

    def __init__(self, config: CNNConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        width = config.base_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            _norm2d(config.norm, width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        for stage in range(config.num_stages):
            out_width = config.base_channels * 2**stage
            for index in range(config.blocks_per_stage):
                blocks.append(ResidualBlock(width, out_width, 2 if index == 0 else 1, config.norm))
                width = out_width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(pixel_values)
        for block in self.blocks:
            hidden = self.run_block(block, hidden)
        logits: torch.Tensor = self.head(hidden.mean(dim=(2, 3)))
        return logits


# ------------------------------------------------------------------------------------ decoder


class DecoderOutput(NamedTuple):
    logits: torch.Tensor
    """(batch, seq, vocab) next-token logits."""
    aux_loss: torch.Tensor | None
    """Sum of the MoE layers' load-balancing losses (already weighted); None without MoE."""


def _rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed per forward in fp32 rather than kept as buffers: a model cast to bf16 would
    # otherwise round its rotary tables, and the cost is a (seq, head_dim) table.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """Grouped-query causal self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads or config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None and sin is not None:
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        # Keys and values are repeated per query group before SDPA (as MiniMind and transformers'
        # Llama do) rather than passed with `enable_gqa`, which keeps every CUDA SDPA kernel eligible.
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        projected: torch.Tensor = self.o_proj(out)
        return projected


class SwiGLU(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """`down(silu(gate(x)) * up(x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class MoEFeedForward(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """Top-k routed SwiGLU experts plus always-on shared experts, with MiniMind's
    load-balancing loss `coef × Σ_i P_i × f_i × num_experts` (P_i: mean router probability of
    expert i, f_i: its share of the assignments). Dispatch by index into fixed-capacity expert
    buffers: see the module docstring for why."""

    is_moe_layer = True

    def __init__(self, config: DecoderConfig, intermediate_size: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_experts = config.num_experts
        self.top_k = config.experts_per_token
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.router = nn.Linear(hidden, self.num_experts, bias=False)
        # Experts' weights stacked (expert, in, out) so that all experts run as one batched matmul.
        self.w_gate = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate_size))
        self.w_up = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate_size))
        self.w_down = nn.Parameter(torch.empty(self.num_experts, intermediate_size, hidden))
        self.shared_experts = nn.ModuleList(
            SwiGLU(hidden, intermediate_size) for _ in range(config.num_shared_experts)
        )

    def capacity(self, num_tokens: int) -> int:
        """Rows of each expert's buffer for a batch of `num_tokens` tokens."""
        share = self.capacity_factor * num_tokens * self.top_k / self.num_experts
        return max(1, min(num_tokens, math.ceil(share)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)
        num_tokens, experts, k = tokens.shape[0], self.num_experts, self.top_k
        capacity = self.capacity(num_tokens)

        probs = self.router(tokens).float().softmax(dim=-1)  # (tokens, experts)
        weights, chosen = probs.topk(k, dim=-1)  # (tokens, k)
        if k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)

        # Assignments in choice-major order, so that first choices claim capacity before second ones.
        expert_of = chosen.t().reshape(-1)  # (k × tokens)
        weight_of = weights.t().reshape(-1)
        one_hot = torch.zeros(k * num_tokens, experts, dtype=torch.int64, device=x.device)
        one_hot.scatter_(1, expert_of.unsqueeze(1), 1)
        position = (one_hot.cumsum(dim=0) - 1).gather(1, expert_of.unsqueeze(1)).squeeze(1)
        kept = position < capacity
        # Dropped assignments go to one spare row past the buffers, which is never read back.
        spare = experts * capacity
        slot = torch.where(kept, expert_of * capacity + position, torch.full_like(position, spare))

        dispatched = tokens.new_zeros(spare + 1, hidden).index_add(0, slot, tokens.repeat(k, 1))
        expert_in = dispatched[:spare].view(experts, capacity, hidden)
        # bmm follows autocast like a Linear layer does: low precision under the mixed precisions.
        act = F.silu(torch.bmm(expert_in, self.w_gate)) * torch.bmm(expert_in, self.w_up)
        expert_out = torch.bmm(act, self.w_down).view(spare, hidden)
        expert_out = torch.cat((expert_out, expert_out.new_zeros(1, hidden)))
        gate = (weight_of * kept).to(expert_out.dtype).unsqueeze(1)
        out = (expert_out.index_select(0, slot) * gate).view(k, num_tokens, hidden).sum(dim=0)
        for shared in self.shared_experts:
            out = out + shared(tokens)

        share_of_assignments = one_hot.float().mean(dim=0)  # f_i / num_experts
        aux_loss = (probs.mean(dim=0) * share_of_assignments * experts).sum() * self.aux_loss_coef
        return out.view(batch, seq, hidden), aux_loss


class DecoderBlock(nn.Module):  # type: ignore[misc]  # torch is untyped to mypy here
    """Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))` (FFN or MoE)."""

    def __init__(self, config: DecoderConfig, intermediate_size: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.ffn: nn.Module = (
            MoEFeedForward(config, intermediate_size)
            if config.use_moe
            else SwiGLU(config.hidden_size, intermediate_size)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        ffn_out = self.ffn(self.ffn_norm(x))
        aux_loss = None
        if isinstance(ffn_out, tuple):
            ffn_out, aux_loss = ffn_out
        return x + self.dropout(ffn_out), aux_loss


def default_intermediate_size(hidden_size: int) -> int:
    """8/3 × hidden rounded up to a multiple of 64 (LLaMA's and MiniMind's SwiGLU width)."""
    return 64 * math.ceil(hidden_size * 8 / 3 / 64)


class Decoder(BlockModel):
    """A compact pre-norm decoder-only language model (MiniMind-like)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        if config.positions == "rope" and head_dim % 2:
            raise ModelBuildError(
                f"model.kwargs: rotary positions need an even head size, but hidden_size / num_heads "
                f"= {config.hidden_size} / {config.num_heads} = {head_dim}."
            )
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embed = (
            nn.Embedding(config.max_seq_len, config.hidden_size) if config.positions == "learned" else None
        )
        intermediate = config.intermediate_size or default_intermediate_size(config.hidden_size)
        self.blocks = nn.ModuleList(DecoderBlock(config, intermediate) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.apply(_init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> DecoderOutput:
        seq = input_ids.shape[1]
        hidden = self.embed(input_ids)
        cos = sin = None
        if self.position_embed is not None:
            hidden = hidden + self.position_embed(torch.arange(seq, device=input_ids.device))
        else:
            head_dim = self.config.hidden_size // self.config.num_heads
            cos, sin = _rotary_tables(seq, head_dim, self.config.rope_theta, input_ids.device)
        hidden = self.dropout(hidden)
        aux_total: torch.Tensor | None = None
        for block in self.blocks:
            hidden, aux_loss = self.run_block(block, hidden, cos, sin)
            if aux_loss is not None:
                aux_total = aux_loss if aux_total is None else aux_total + aux_loss
        logits = self.lm_head(self.norm(hidden))
        return DecoderOutput(logits, aux_total)


def _init_weights(module: nn.Module) -> None:
    # Small normal weights (GPT-2 / LLaMA practice): PyTorch's default N(0, 1) embeddings, shared
    # with the output layer, would start with huge logits.
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=_INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MoEFeedForward):
        for weight in (module.w_gate, module.w_up, module.w_down):
            nn.init.normal_(weight, std=_INIT_STD)


# ------------------------------------------------------------------------------------ builder


def build_builtin(
    name: str, kwargs: dict[str, Any], inputs: TokensInputs | ImageInputs | FeaturesInputs
) -> BlockModel:
    """Build builtin model `name` from its kwargs (a `tuner.builtin_configs` class) for `inputs`."""
    config_class = BUILTIN_CONFIGS.get(name)
    if config_class is None:
        raise ModelBuildError(f"model.name must be one of {sorted(BUILTIN_CONFIGS)}, got {name!r}.")
    try:
        config = config_class.model_validate(kwargs)
    except ValidationError as exc:
        raise ModelBuildError(f"model.kwargs for builtin {name!r}: {format_validation_error(exc)}.") from None
    if isinstance(config, MLPConfig) and isinstance(inputs, FeaturesInputs):
        return MLP(config, inputs.dim, inputs.num_classes)
    if isinstance(config, CNNConfig) and isinstance(inputs, ImageInputs):
        return CNN(config, inputs.channels, inputs.num_classes)
    if isinstance(config, DecoderConfig) and isinstance(inputs, TokensInputs):
        return Decoder(config)
    raise ModelBuildError(f"inputs.kind {inputs.kind!r} does not fit builtin model {name!r}.")
