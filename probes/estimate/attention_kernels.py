"""CPU kernels for CUDA's fused attention ops (flash and memory-efficient, forward and backward).

CPU-only torch has meta kernels for these ops, so a fake-tensor trace runs them, but no CPU
kernels. These let the same emulated trace run on real CPU tensors too, which is how the tests
check that the fake trace's peak is the real one. Each kernel allocates exactly the outputs the
op's meta kernel describes (shapes, strides, dtypes: flash's logsumexp is fp32 [B, H, L]) and
fills them by plain attention math; its intermediates run below the tracking mode, as a CUDA
kernel's registers and shared memory would, so they are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_map

aten = torch.ops.aten


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _outputs_like_meta(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """Empty CPU tensors shaped as `op`'s meta kernel says; non-tensors as it returns them."""
    meta = op(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
    return [
        torch.empty_strided(m.shape, m.stride(), dtype=m.dtype) if isinstance(m, torch.Tensor) else m
        for m in meta
    ]


def _scores(
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fp32 attention probabilities, logsumexp and the scale; keys repeated for grouped queries."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    key32 = _repeat_heads(key.float(), query.shape[-3])
    scores = (query.float() @ key32.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.float()
    if is_causal:
        length, source = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(length, source, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    logsumexp = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - logsumexp.unsqueeze(-1)), logsumexp, scale


def _repeat_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    repeats = heads // tensor.shape[-3]
    return tensor if repeats == 1 else tensor.repeat_interleave(repeats, dim=-3)


def _sum_head_groups(grad: torch.Tensor, heads: int) -> torch.Tensor:
    groups = grad.shape[-3] // heads
    return grad if groups == 1 else grad.unflatten(-3, (heads, groups)).sum(-3)


def _forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    probs, logsumexp, _ = _scores(query, key, bias, is_causal, scale)
    return probs @ _repeat_heads(value.float(), query.shape[-3]), logsumexp


def _backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    probs, _, scale = _scores(query, key, bias, is_causal, scale)
    heads = query.shape[-3]
    grad32 = grad_out.float()
    grad_value = probs.transpose(-2, -1) @ grad32
    grad_probs = grad32 @ _repeat_heads(value.float(), heads).transpose(-2, -1)
    grad_scores = probs * (grad_probs - (grad32 * out.float()).sum(-1, keepdim=True))
    grad_query = (grad_scores @ _repeat_heads(key.float(), heads)) * scale
    grad_key = (grad_scores.transpose(-2, -1) @ query.float()) * scale
    kv_heads = key.shape[-3]
    return (
        grad_query,
        _sum_head_groups(grad_key, kv_heads),
        _sum_head_groups(grad_value, kv_heads),
        grad_scores,
    )


def flash_forward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """`aten::_scaled_dot_product_flash_attention` on CPU."""
    outputs = _outputs_like_meta(aten._scaled_dot_product_flash_attention.default, args, kwargs)
    query, key, value = args[:3]
    is_causal = bool(args[4]) if len(args) > 4 else bool(kwargs.get("is_causal", False))
    result, logsumexp = _forward(query, key, value, None, is_causal, kwargs.get("scale"))
    outputs[0].copy_(result)
    outputs[1].copy_(logsumexp)
    return tuple(outputs)


def flash_backward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """`aten::_scaled_dot_product_flash_attention_backward` on CPU."""
    outputs = _outputs_like_meta(aten._scaled_dot_product_flash_attention_backward.default, args, kwargs)
    grad_out, query, key, value, out = args[:5]
    is_causal = bool(args[11])
    grads = _backward(grad_out, query, key, value, out, None, is_causal, kwargs.get("scale"))
    for target, grad in zip(outputs, grads[:3], strict=True):
        target.copy_(grad)
    return tuple(outputs)


def efficient_forward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """`aten::_scaled_dot_product_efficient_attention` on CPU."""
    outputs = _outputs_like_meta(aten._scaled_dot_product_efficient_attention.default, args, kwargs)
    query, key, value, bias = args[:4]
    is_causal = bool(args[6]) if len(args) > 6 else bool(kwargs.get("is_causal", False))
    result, logsumexp = _forward(query, key, value, bias, is_causal, kwargs.get("scale"))
    outputs[0].copy_(result)
    if outputs[1].numel():
        # The kernel pads logsumexp's last dimension; only the real positions carry values.
        outputs[1][..., : logsumexp.shape[-1]].copy_(logsumexp)
    return tuple(outputs)


def efficient_backward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """`aten::_scaled_dot_product_efficient_attention_backward` on CPU."""
    outputs = _outputs_like_meta(aten._scaled_dot_product_efficient_attention_backward.default, args, kwargs)
    grad_out, query, key, value, bias, out = args[:6]
    is_causal = bool(args[11]) if len(args) > 11 else bool(kwargs.get("is_causal", False))
    grads = _backward(grad_out, query, key, value, out, bias, is_causal, kwargs.get("scale"))
    for target, grad in zip(outputs, grads, strict=True):
        if isinstance(target, torch.Tensor) and target.numel():
            target.copy_(_fit(grad, target.shape))
    return tuple(outputs)


def _fit(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`grad` reduced over the dimensions a broadcast bias had (zeros where the kernel padded)."""
    if grad.shape == shape:
        return grad
    fitted = torch.zeros(shape, dtype=grad.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(shape, grad.shape, strict=True))
    fitted[region] = grad.sum_to_size(*(1 if a == 1 else b for a, b in zip(shape, grad.shape, strict=True)))[
        region
    ]
    return fitted


CPU_KERNELS: dict[str, Any] = {
    "_scaled_dot_product_flash_attention": flash_forward,
    "_scaled_dot_product_flash_attention_backward": flash_backward,
    "_scaled_dot_product_efficient_attention": efficient_forward,
    "_scaled_dot_product_efficient_attention_backward": efficient_backward,
}
"""Op name → its CPU kernel."""
