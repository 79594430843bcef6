"""A custom-code transformers model, shaped like MiniMind's (`model/model_minimind.py`): a
`PreTrainedModel` subclass with a config class of its own (`model_type` "tinymind", unknown to
transformers), its own attention and RMSNorm, rotary tables as buffers that `forward` checks by
value (`if self.freqs_cos[0, 0] == 0`), and an optional MoE feed-forward that routes with `topk`
and picks each expert's tokens with `mask.any()` and `nonzero`, as MiniMind's does.

Written for the tests (not MiniMind's code): what matters is that it exercises the same things a
user's model does, a config class transformers does not know, value reads in the step, routing
whose shapes depend on the values, and no support for `gradient_checkpointing_enable`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast


class TinyMindConfig(PretrainedConfig):
    model_type = "tinymind"

    def __init__(
        self,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        vocab_size: int = 256,
        max_position_embeddings: int = 32768,
        intermediate_size: int | None = None,
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        router_aux_loss_coef: float = 5e-4,
        rope_theta: float = 1e6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.intermediate_size = intermediate_size or math.ceil(hidden_size * math.pi / 16) * 16
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_aux_loss_coef = router_aux_loss_coef
        self.rope_theta = rope_theta
        self.head_dim = hidden_size // num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).type_as(x)


def rotary_tables(head_dim: int, end: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        repeat = self.heads // self.kv_heads
        k = k.repeat_interleave(repeat, dim=2)
        v = v.repeat_interleave(repeat, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Top-k routing; each expert runs on the tokens routed to it (their count is data)."""

    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.num_experts)])
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        flat = x.view(-1, hidden)
        scores = F.softmax(self.gate(flat), dim=-1)
        weights, chosen = torch.topk(scores, k=self.config.num_experts_per_tok, dim=-1, sorted=False)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(flat)
        for i, expert in enumerate(self.experts):
            mask = chosen == i
            if mask.any():
                tokens = mask.any(dim=-1).nonzero().flatten()
                weight = weights[mask].view(-1, 1)
                out.index_add_(0, tokens, (expert(flat[tokens]) * weight).to(out.dtype))
            elif self.training:
                out[0, 0] += 0 * sum(p.sum() for p in expert.parameters())
        load = F.one_hot(chosen, self.config.num_experts).float().mean(0)
        balance = (load * scores.mean(0)).sum() * self.config.num_experts
        self.aux_loss = balance * self.config.router_aux_loss_coef
        return out.view(batch, seq, hidden)


class Block(nn.Module):
    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp: nn.Module = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMindModel(nn.Module):
    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size)
        cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = input_ids.shape[1]
        hidden = self.embed_tokens(input_ids)
        # MiniMind's guard against rotary tables lost to a meta-device build: a read of a value.
        if self.freqs_cos[0, 0] == 0:
            config = self.config
            cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
            self.freqs_cos, self.freqs_sin = cos.to(hidden.device), sin.to(hidden.device)
        cos, sin = self.freqs_cos[:seq], self.freqs_sin[:seq]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        aux = [layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)]
        aux_loss = sum((a for a in aux if a is not None), hidden.new_zeros(()))
        return self.norm(hidden), aux_loss


class TinyMindForCausalLM(PreTrainedModel):
    config_class = TinyMindConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (transformers reads it)

    def __init__(self, config: TinyMindConfig) -> None:
        super().__init__(config)
        self.model = TinyMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> MoeCausalLMOutputWithPast:
        hidden, aux_loss = self.model(input_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # HF's convention: the labels are the inputs, shifted here.
            x, y = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
            loss = F.cross_entropy(x.view(-1, x.size(-1)), y.view(-1), ignore_index=-100)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits)


def tiny_mind(**overrides: Any) -> TinyMindForCausalLM:
    """The model as a user's script builds it: its own config class, then the model."""
    return TinyMindForCausalLM(TinyMindConfig(**overrides))
