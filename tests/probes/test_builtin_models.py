"""The builtin decoder's mixture-of-experts layer and attention, checked against plain
reference computations."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from probes.builtin_models import Decoder, MoEFeedForward, default_intermediate_size
from tuner.builtin_configs import DecoderConfig

HIDDEN, INTERMEDIATE = 16, 24


def moe_layer(capacity_factor: float, *, experts: int = 4, k: int = 2, shared: int = 1) -> MoEFeedForward:
    torch.manual_seed(0)
    config = DecoderConfig(
        hidden_size=HIDDEN,
        num_heads=2,
        use_moe=True,
        num_experts=experts,
        experts_per_token=k,
        num_shared_experts=shared,
        moe_capacity_factor=capacity_factor,
    )
    layer = MoEFeedForward(config, INTERMEDIATE)
    for weight in (layer.w_gate, layer.w_up, layer.w_down):
        torch.nn.init.normal_(weight, std=0.2)
    return layer


def reference_moe(layer: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token, choice by choice: first choices claim an expert's capacity before second
    ones, earlier tokens before later ones; an assignment past the capacity is dropped."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = layer.router(tokens).softmax(dim=-1)
    weights, chosen = probs.topk(layer.top_k, dim=-1)
    if layer.top_k > 1:  # MiniMind renormalises the chosen weights; a single choice keeps its probability
        weights = weights / weights.sum(dim=-1, keepdim=True)
    capacity = layer.capacity(tokens.shape[0])
    filled = [0] * layer.num_experts
    out = torch.zeros_like(tokens)
    for choice in range(layer.top_k):
        for t in range(tokens.shape[0]):
            e = int(chosen[t, choice])
            if filled[e] >= capacity:
                continue
            filled[e] += 1
            hidden = F.silu(tokens[t] @ layer.w_gate[e]) * (tokens[t] @ layer.w_up[e])
            out[t] += weights[t, choice] * (hidden @ layer.w_down[e])
    for shared in layer.shared_experts:
        out = out + shared(tokens)
    share = torch.zeros(layer.num_experts)
    for e in chosen.reshape(-1).tolist():
        share[e] += 1 / chosen.numel()
    aux = (probs.mean(dim=0) * share * layer.num_experts).sum() * layer.aux_loss_coef
    return out.view_as(x), aux


@pytest.mark.parametrize(
    ("capacity_factor", "experts", "k", "shared"),
    [(2.0, 4, 2, 1), (1.0, 4, 2, 0), (0.5, 4, 2, 1), (1.25, 8, 1, 2), (3.0, 3, 3, 0)],
)
def test_moe_matches_a_token_by_token_reference(
    capacity_factor: float, experts: int, k: int, shared: int
) -> None:
    layer = moe_layer(capacity_factor, experts=experts, k=k, shared=shared)
    x = torch.randn(3, 10, HIDDEN)
    out, aux = layer(x)
    expected_out, expected_aux = reference_moe(layer, x)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, expected_aux)


def test_a_capacity_factor_of_experts_over_k_drops_nothing() -> None:
    layer = moe_layer(capacity_factor=2.0, experts=4, k=2)
    assert layer.capacity(30) == 30  # every token could pick the same expert and still fit


def test_a_small_capacity_drops_assignments() -> None:
    # With room for one assignment per expert, at most 4 of the 60 assignments reach an expert.
    layer = moe_layer(capacity_factor=1e-3, experts=4, k=2, shared=0)
    assert layer.capacity(30) == 1
    out, _ = layer(torch.randn(1, 30, HIDDEN))
    assert int((out.abs().sum(dim=-1) > 0).sum()) <= 4


class ShapeRecorder(TorchDispatchMode):
    """Records the op and output shape of every operation run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.ops.append((str(func), tuple(tensor.shape)))
        return out


def test_moe_allocations_do_not_depend_on_the_routing() -> None:
    # The estimator's trace and a GPU run see the same tensors whatever the router decides.
    layer = moe_layer(capacity_factor=1.25)
    recorded = []
    for scale in (0.01, 100.0):  # near-uniform routing, then routing that piles onto few experts
        layer.zero_grad(set_to_none=True)
        recorder = ShapeRecorder()
        with recorder:
            out, aux = layer(torch.randn(2, 12, HIDDEN) * scale)
            (out.sum() + aux).backward()
        recorded.append(recorder.ops)
    assert recorded[0] == recorded[1]


def test_the_decoder_is_causal() -> None:
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=12))
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 50
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_rotary_positions_make_the_decoder_order_aware() -> None:
    # Without positions a causal decoder's first token would see only itself either way; with
    # rotary positions two permutations of the same prefix give different last logits.
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, max_seq_len=8))
    ids = torch.tensor([[1, 2, 3, 4]])
    swapped = torch.tensor([[2, 1, 3, 4]])
    assert not torch.allclose(model(ids).logits[:, -1], model(swapped).logits[:, -1])


def test_the_default_feed_forward_width_is_eight_thirds_rounded_to_64() -> None:
    assert default_intermediate_size(512) == 1408
    assert default_intermediate_size(768) == 2048
    assert all(default_intermediate_size(h) % 64 == 0 for h in (1, 100, 4096))
    assert default_intermediate_size(4096) >= math.ceil(4096 * 8 / 3)
