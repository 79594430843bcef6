"""Reads of tensor values in a fake-tensor trace: shape-only stand-ins and stated assumptions.

A fake tensor has a shape and no values, so a step that reads one (`if t[0, 0] == 0:`,
`mask.any()`, `mask.nonzero()`, `x[mask]`) cannot be traced as it is. Most such reads do not
change memory, or change it in a way an assumption pins down; `ValueReads`, a dispatch mode over
the fake-tensor mode, answers them and records what it assumed, with the user's file and line:

- **MoE routing.** The indices of `topk` over E experts are remembered; `indices == i` is an
  expert's routing mask, whose number of true entries is the assumption: `balanced` (the default)
  gives every expert N·k/E of the N·k routed slots (rounded up, so the experts together never take
  fewer than all of them); `hottest` gives experts 0 … k−1 every token and the others none (the
  worst imbalance top-k routing allows). `mask.any()`, `mask.any(dim)`, `mask.nonzero()` and
  `x[mask]` (and its backward) then follow from that count. The slots over all experts are N·k
  either way, so the saved activations, and the traced peak, move little (within 1 % on the
  tests' model); what changes is the size of the busiest expert's blocks, which the caching
  allocator sees.
- **Other boolean reads** (`if t[0, 0] == 0:`, `if torch.all(mask == 1):`) are read as true: the
  branch they guard is taken, which in a model is the one that does the work (recomputing a
  table, running an expert). Other masks (`nonzero`, boolean indexing) are taken as all true,
  the largest their results can be.
- **Numbers** (`.item()` of a float or an int, `.tolist()`) would decide sizes or control flow the
  trace cannot guess: the estimate fails with an `EstimateError` that names the op and the line.

Each assumption is stated once, in words, with the line that made it (`ValueReads.assumptions`);
the probe's result carries them and the plan repeats them in its hints.
"""

from __future__ import annotations

import math
import os
import traceback
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

import tuner.errors
from tuner.errors import EstimateError

__all__ = ["Routing", "ValueReads", "user_location"]

Routing = Literal["balanced", "hottest"]

aten = torch.ops.aten
_SAME_VALUES = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.flatten.using_ints,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.squeeze.dim,
    aten.squeeze.default,
    aten.unsqueeze.default,
}
"""Ops whose output holds the input's values (a routing index stays one, a mask keeps its count)."""
_INDEX_OPS = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
_ANY_DIM = {aten.any.dim, aten.any.dims}
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, *_INDEX_OPS}
_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (torch.__file__, os.path.dirname(os.path.abspath(__file__)), tuner.errors.__file__)
)
"""torch, `probes/` and `tuner/`: frames in them are not where the user's model reads a value."""


def user_location(error: BaseException | None = None) -> str:
    """`file:line` of the innermost frame outside torch and the tuner (the model's or the step's
    own code): of the running stack, or of where `error` was raised; `an unknown line` when none."""
    frames = traceback.extract_tb(error.__traceback__) if error is not None else traceback.extract_stack()
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_LIBRARY_DIRS) or frame.filename.startswith("<"):
            continue
        return f"{path}:{frame.lineno}"
    return "an unknown line"


class ValueReads(TorchDispatchMode):  # type: ignore[misc]
    """Answers the value reads of a fake-tensor trace (see the module's docstring)."""

    def __init__(self, routing: Routing = "balanced", *, name: str = "this") -> None:
        super().__init__()
        self.routing: Routing = routing
        self.name = name
        """The workload's short name, for errors."""
        self._assumptions: dict[str, None] = {}
        self._routing_index: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """topk indices (and their reshapes) → (experts, k, the line of the topk)."""
        self._true_count: WeakIdKeyDictionary = WeakIdKeyDictionary()
        """Boolean masks whose number of true entries the assumption fixes → that number."""

    @property
    def assumptions(self) -> list[str]:
        """What the trace assumed, in words, each once, in the order first made."""
        return list(self._assumptions)

    def _assume(self, text: str) -> None:
        self._assumptions.setdefault(text, None)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _READS and not self._tracked(args):
            try:  # the fake-tensor mode knows the values of constants (an optimizer's step count)
                return func(*args, **kwargs)
            except _DATA_DEPENDENT:
                pass
        if func is aten._local_scalar_dense.default:
            return self._scalar(args[0])
        if func is aten.nonzero.default:
            return self._nonzero(args[0])
        if func is aten.masked_select.default:
            count = self._count(args[1])
            return torch.empty((count,), dtype=args[0].dtype, device=args[0].device)
        if func in _INDEX_OPS and any(_is_mask(i) for i in args[1]):
            indices = self._without_masks(args[1])
            return func(args[0], indices, *args[2:], **kwargs)
        output = func(*args, **kwargs)
        self._follow(func, args, kwargs, output)
        return output

    def _tracked(self, args: tuple[Any, ...]) -> bool:
        """Whether a read's mask is one whose count the routing assumption fixes."""
        candidates = [a for a in args if isinstance(a, torch.Tensor)]
        for arg in args:
            if isinstance(arg, list | tuple):
                candidates += [i for i in arg if isinstance(i, torch.Tensor)]
        return any(t in self._true_count for t in candidates)

    # -- what the reads return ------------------------------------------------------------------

    def _scalar(self, tensor: torch.Tensor) -> Any:
        if tensor.dtype == torch.bool:
            known = self._true_count.get(tensor)
            if known is not None:
                return known > 0
            self._assume(
                f"a tensor value read as a condition at {user_location()} was taken as true (a trace has no "
                "values; the branch it guards is assumed taken)"
            )
            return True
        raise EstimateError(
            f"The {self.name} workload cannot be estimated without a GPU: its step reads a tensor's value "
            f"as a number (.item(), int(), .tolist(): aten._local_scalar_dense) at {user_location()}, "
            "which a trace without values cannot know; use the cuda backend, or a step that does not read it."
        )

    def _nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        count = self._count(mask)
        return torch.empty((count, mask.dim()), dtype=torch.long, device=mask.device)

    def _count(self, mask: torch.Tensor) -> int:
        """True entries of `mask`: its routing count, or (stated) all of them."""
        known = self._true_count.get(mask)
        if known is not None:
            return int(known)
        self._assume(
            f"a mask's true entries (nonzero, boolean indexing) at {user_location()} were taken as all "
            "of them, the largest its result can be"
        )
        return int(mask.numel())

    def _without_masks(self, indices: list[Any]) -> list[Any]:
        """Boolean indices as the integer indices of their (assumed) true entries."""
        converted: list[Any] = []
        for index in indices:
            if _is_mask(index):
                converted.extend(self._nonzero(index).unbind(1))
            else:
                converted.append(index)
        return converted

    # -- what the trace remembers ---------------------------------------------------------------

    def _follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if func is aten.topk.default:
            source, k = args[0], int(args[1])
            dim = int(args[2]) if len(args) > 2 else int(kwargs.get("dim", -1))
            experts = int(source.shape[dim])
            if experts > 1 and k < experts:
                self._routing_index[output[1]] = (experts, k, user_location())
            return
        if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
            return
        source = args[0]
        if func in _SAME_VALUES:
            if source in self._routing_index:
                self._routing_index[output] = self._routing_index[source]
            if source in self._true_count and output.dtype == torch.bool:
                self._true_count[output] = self._true_count[source]
        elif func is aten.eq.Scalar and source in self._routing_index:
            self._true_count[output] = self._expert_share(source, args[1])
        elif func is aten.eq.Tensor and source in self._routing_index:
            self._true_count[output] = self._expert_share(source, None)
        elif func is aten.any.default and source in self._true_count:
            self._true_count[output] = min(self._true_count[source], 1)
        elif func in _ANY_DIM and source in self._true_count:
            # A token's top-k experts are distinct: a row of a routing mask holds at most one true.
            self._true_count[output] = min(self._true_count[source], output.numel())

    def _expert_share(self, index: torch.Tensor, expert: Any) -> int:
        experts, k, where = self._routing_index[index]
        tokens = index.numel() // k if index.numel() % k == 0 else index.numel()
        if self.routing == "hottest":
            self._assume(
                f"MoE routing at {where}: the hottest experts take every token (experts 0–{k - 1} of "
                f"{experts} each get all tokens, the others none; moe_routing 'hottest')"
            )
            hot = expert is None or int(expert) < k
            return tokens if hot else 0
        self._assume(
            f"MoE routing at {where}: balanced, each of {experts} experts takes {k}/{experts} of the "
            f"tokens (top-{k}); the real split is data: the slots are the same in all, a skewed split "
            "makes the busiest expert's blocks larger (moe_routing 'hottest' plans for the most skewed)"
        )
        return int(min(tokens, math.ceil(tokens * k / experts)))


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
