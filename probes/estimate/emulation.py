"""Make a CPU trace allocate what a CUDA training step allocates.

Three differences between torch's CPU and CUDA paths change the memory of a step, and each is
patched here (docs/estimate.md):

- dropout: CPU keeps a mask in the input's dtype (`bernoulli_` then multiply); CUDA runs the
  fused `native_dropout`, which saves a bool mask. `aten::dropout` is routed to `native_dropout`.
- scaled-dot-product attention: CPU takes the math path (the full [B, H, L, L] score matrix is
  saved); CUDA picks a fused kernel. `aten::scaled_dot_product_attention` is routed as CUDA
  would route it on an H100: flash for fp16/bf16 without a mask, memory-efficient (no grouped
  queries) otherwise, math as the last resort. The fused ops have meta kernels, so they run on
  fake CPU tensors; `attention_kernels` gives them CPU kernels for real CPU tensors.
- transformers' mask builder treats a fake tensor as a compile-time trace: it cannot look at the
  position ids, so it assumes packed sequences and builds an explicit [B, 1, L, L] mask, which
  forces SDPA off the flash kernel. The canonical batch is never packed (one sequence per row),
  which is what the real check finds on a GPU, so the check answers that for fake tensors.
- autocast: CPU autocast keeps `softmax`, `layer_norm`, `pow`, `sum`… in low precision, CUDA
  autocast runs them in fp32. CUDA's policies (`autocast_lists`) are registered for the
  `AutocastCPU` key, and CPU-only policies are replaced by fallthroughs.

Everything here is process-global and cannot be undone cheaply: install it only in a process
made for estimating (`probes.child.run_in_child`), never in a process that trains.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map

from probes.estimate import attention_kernels, autocast_lists

aten = torch.ops.aten

_LOCK = threading.Lock()
_LIBRARIES: list[torch.library.Library] = []
"""Kept alive: a `Library` that is garbage-collected takes its registrations with it."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def installed() -> bool:
    """True once `install_cuda_emulation` ran in this process."""
    return bool(_LIBRARIES)


def install_cuda_emulation() -> None:
    """Patch this process so that CPU (real or fake) tensors allocate as on CUDA. Idempotent."""
    with _LOCK:
        if _LIBRARIES:
            return
        import warnings

        with warnings.catch_warnings():
            # torch warns on every kernel it overrides; overriding is the point here.
            warnings.simplefilter("ignore", UserWarning)
            library = torch.library.Library("aten", "IMPL")
            library.impl("dropout", _dropout, "CompositeImplicitAutograd")
            library.impl(
                "scaled_dot_product_attention", _scaled_dot_product_attention, "CompositeImplicitAutograd"
            )
            for name, kernel in attention_kernels.CPU_KERNELS.items():
                library.impl(name, kernel, "CPU")
            _register_cuda_autocast(library)
        _LIBRARIES.append(library)


def patch_transformers() -> None:
    """Apply the transformers part of the emulation, if transformers is imported. Idempotent."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None or getattr(masking.find_packed_sequence_indices, "_tuner_emulated", False):
        return
    original = masking.find_packed_sequence_indices

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
        if isinstance(position_ids, FakeTensor):
            return None  # the canonical batch: one sequence per row, never packed
        return original(position_ids)

    find_packed_sequence_indices._tuner_emulated = True  # type: ignore[attr-defined]
    setattr(masking, "find_packed_sequence_indices", find_packed_sequence_indices)  # noqa: B010


# --- dropout -------------------------------------------------------------------------------


def _dropout(input: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """`aten::dropout` as CUDA runs it: the fused kernel with a bool mask."""
    if not train or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        return input * torch.zeros((), dtype=input.dtype, device=input.device)
    output: torch.Tensor = aten.native_dropout.default(input, p, train)[0]
    return output


# --- scaled-dot-product attention ------------------------------------------------------------


def sdpa_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    enable_gqa: bool,
) -> str:
    """`flash`, `efficient` or `math`: the kernel CUDA's SDPA picks on an H100 (sm90), in its
    default priority order (flash, memory-efficient, math; cuDNN is not preferred by default)."""
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) != 1 or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "math"
    head_dim = query.shape[-1]
    same_head_dim = key.shape[-1] == head_dim and value.shape[-1] == head_dim
    grouped = query.shape[-3] != key.shape[-3]
    if grouped and not enable_gqa:
        return "math"
    if (
        query.dtype in _LOW_PRECISION
        and attn_mask is None
        and same_head_dim
        and head_dim <= _FLASH_MAX_HEAD_DIM
    ):
        return "flash"
    alignment = 4 if query.dtype == torch.float32 else 8
    if (
        query.dtype in (torch.float32, *_LOW_PRECISION)
        and not grouped
        and head_dim % alignment == 0
        and value.shape[-1] % alignment == 0
    ):
        return "efficient"
    return "math"


def _scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    backend = sdpa_backend(query, key, value, attn_mask, enable_gqa)
    output: torch.Tensor
    if backend == "flash":
        output = aten._scaled_dot_product_flash_attention.default(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    elif backend == "efficient":
        needs_logsumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        output = aten._scaled_dot_product_efficient_attention.default(
            query,
            key,
            value,
            _additive_bias(attn_mask, query.dtype),
            needs_logsumexp,
            dropout_p,
            is_causal,
            scale=scale,
        )[0]
    else:
        output = aten._scaled_dot_product_attention_math.default(
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
        )[0]
    return output


def _additive_bias(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask becomes an additive float bias, as CUDA's SDPA converts it."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    blocked = torch.full((), float("-inf"), dtype=dtype, device=attn_mask.device)
    kept = torch.zeros((), dtype=dtype, device=attn_mask.device)
    return torch.where(attn_mask.logical_not(), blocked, kept)


# --- autocast ---------------------------------------------------------------------------------

_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _register_cuda_autocast(library: torch.library.Library) -> None:
    cuda_ops = autocast_lists.all_cuda_autocast_ops()
    for name in autocast_lists.LOWER_PRECISION_FP:
        if _exists(name) and not _has_cpu_autocast(name):
            # Ops CPU autocast already runs in low precision keep CPU's kernel (and its cast
            # cache of fp32 weights, which CUDA has too).
            library.impl(name, _casting_kernel(name, _to_autocast_dtype), "AutocastCPU")
    for name in autocast_lists.FP32:
        if _exists(name):
            library.impl(name, _casting_kernel(name, _to_fp32), "AutocastCPU")
    for name in autocast_lists.FP32_SET_OPT_DTYPE:
        if _exists(name):
            library.impl(name, _fp32_dtype_kernel(name), "AutocastCPU")
    for name, target in autocast_lists.FP32_APPEND_DTYPE.items():
        if _exists(name):
            library.impl(name, _append_dtype_kernel(name, target), "AutocastCPU")
    for name in autocast_lists.PROMOTE:
        if _exists(name):
            library.impl(name, _promoting_kernel(name), "AutocastCPU")
    for name, reason in autocast_lists.BANNED.items():
        if _exists(name):
            library.impl(name, _banned_kernel(reason), "AutocastCPU")
    for name in cpu_only_autocast_ops(cuda_ops):
        # CUDA autocast leaves these alone: let them fall through to their composite or
        # backend kernels (whose inner ops then meet CUDA's policies).
        library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")


def cpu_only_autocast_ops(cuda_ops: frozenset[str]) -> list[str]:
    """Ops with an `AutocastCPU` kernel that CUDA autocast does not list."""
    names = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("aten::"):
            continue
        name = qualified.removeprefix("aten::")
        if name not in cuda_ops and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "AutocastCPU"):
            names.append(name)
    return sorted(names)


def _exists(name: str) -> bool:
    try:
        _overload(name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_cpu_autocast(name: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "AutocastCPU"))


def _overload(name: str) -> Any:
    packet, _, overload = name.partition(".")
    return getattr(getattr(aten, packet), overload or "default")


def _eligible(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type == "cpu"
        and value.dtype != torch.float64
    )


def _cast_all(values: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda v: v.to(dtype) if _eligible(v) and v.dtype != dtype else v, values)


def _to_fp32(_values: Any) -> torch.dtype:
    return torch.float32


def _to_autocast_dtype(_values: Any) -> torch.dtype:
    return torch.get_autocast_dtype("cpu")


def _casting_kernel(name: str, target: Callable[[Any], torch.dtype]) -> Callable[..., Any]:
    op = _overload(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        dtype = target((args, kwargs))
        args, kwargs = _cast_all((args, kwargs), dtype)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)

    return kernel


def _promoting_kernel(name: str) -> Callable[..., Any]:
    op = _overload(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        dtype = torch.get_autocast_dtype("cpu")
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            if _eligible(value):
                dtype = torch.promote_types(dtype, value.dtype)
        args, kwargs = _cast_all((args, kwargs), dtype)
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)

    return kernel


def _first_tensor(values: Any) -> torch.Tensor | None:
    for value in torch.utils._pytree.tree_leaves(values):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _fp32_dtype_kernel(name: str) -> Callable[..., Any]:
    op = _overload(name)
    position = [a.name for a in op._schema.arguments].index("dtype")

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if _eligible(_first_tensor(args)):
            if len(args) > position:
                if args[position] is None:
                    args = (*args[:position], torch.float32, *args[position + 1 :])
            elif kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            return op(*args, **kwargs)

    return kernel


def _append_dtype_kernel(name: str, target_name: str) -> Callable[..., Any]:
    op, target = _overload(name), _overload(target_name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
            if _eligible(_first_tensor(args)):
                if len(args) == 1 and "p" not in kwargs:
                    args = (*args, 2)  # the dtype overload has no default norm order
                return target(*args, **kwargs, dtype=torch.float32)
            return op(*args, **kwargs)

    return kernel


def _banned_kernel(reason: str) -> Callable[..., Any]:
    def kernel(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError(reason)

    return kernel
