"""A MiniMind-shaped model for examples/minimind_pretrain.py: the structure of MiniMind's
`model/model_minimind.py` (jingyaogong/minimind), written small: a `PreTrainedModel` with a config
class of its own (`model_type` "minimind-example", unknown to transformers), grouped-query attention
with RMS-normed queries and keys and rotary tables kept as buffers, SwiGLU feed-forwards or a
top-k MoE layer with an auxiliary load-balancing loss, tied embeddings, and labels shifted inside
`forward`, as a Hugging Face causal LM does.

One difference from MiniMind, for exactness checks in float64: RMSNorm computes in at least fp32
(`promote_types(x.dtype, float32)`), where MiniMind's `.float()` would round a float64 model's
activations to fp32. In bf16 or fp16 training both compute in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast


class MiniMindConfig(PretrainedConfig):
    model_type = "minimind-example"

    def __init__(
        self,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        vocab_size: int = 6400,
        max_position_embeddings: int = 32768,
        rope_theta: float = 1e6,
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int = 1,
        router_aux_loss_coef: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.use_moe = use_moe
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_aux_loss_coef = router_aux_loss_coef
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = math.ceil(hidden_size * math.pi / 64) * 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return (self.weight * wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rotary_tables(head_dim: int, end: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.unsqueeze(1) + turned * sin.unsqueeze(1)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, seq, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """MiniMind's routing: top-k experts per token, each expert run on the tokens routed to it."""

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([FeedForward(config) for _ in range(config.num_experts)])
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = F.softmax(self.gate(flat), dim=-1)
        weights, chosen = torch.topk(scores, k=self.config.num_experts_per_tok, dim=-1, sorted=False)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = torch.zeros_like(flat)
        for i, expert in enumerate(self.experts):
            mask = chosen == i
            if mask.any():
                tokens = mask.any(dim=-1).nonzero().flatten()
                out.index_add_(0, tokens, (expert(flat[tokens]) * weights[mask].view(-1, 1)).to(out.dtype))
            elif self.training:  # every expert takes part in backward, as under DDP it must
                out[0, 0] += 0 * sum(p.sum() for p in expert.parameters())
        load = F.one_hot(chosen, self.config.num_experts).float().mean(0)
        balance = (load * scores.mean(0)).sum() * self.config.num_experts
        self.aux_loss = balance * self.config.router_aux_loss_coef
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp: nn.Module = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class MiniMindModel(nn.Module):
    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size)
        cos, sin = rotary_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        cos = self.freqs_cos[:seq].to(hidden.dtype)
        sin = self.freqs_sin[:seq].to(hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        aux = [layer.mlp.aux_loss for layer in self.layers if isinstance(layer.mlp, MoEFeedForward)]
        aux_loss = sum((a for a in aux if a is not None), hidden.new_zeros(()))
        return self.norm(hidden), aux_loss


class MiniMindForCausalLM(PreTrainedModel):
    config_class = MiniMindConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight
        self.post_init()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> MoeCausalLMOutputWithPast:
        hidden, aux_loss = self.model(input_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # the labels are the inputs: shifted here, as transformers does
            x, y = logits[..., :-1, :].contiguous(), labels[..., 1:].contiguous()
            loss = F.cross_entropy(x.view(-1, x.size(-1)), y.view(-1), ignore_index=-100)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=logits)
