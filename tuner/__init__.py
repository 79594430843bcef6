"""tuner: the largest micro-batch that fits a GPU, and the accumulation plan that reaches an
effective batch.

`plan_for` and `autotune` are imported lazily so that `import tuner` (and the API process) never
imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tuner.version import __version__

if TYPE_CHECKING:
    from tuner.autotuning import autotune
    from tuner.integration import plan_for

__all__ = ["__version__", "autotune", "plan_for"]


def __getattr__(name: str) -> Any:
    if name == "plan_for":
        from tuner.integration import plan_for

        return plan_for
    if name == "autotune":
        from tuner.autotuning import autotune

        return autotune
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
