"""`PYTORCH_CUDA_ALLOC_CONF`, parsed: the caching-allocator settings a plan assumes.

Pure (no torch): the API validates a request's `alloc_conf` with it, and the estimator's
allocator model (`probes.estimate.allocator`) runs with the settings it returns. The text is
kept in its canonical form (options sorted, values normalised) so that two spellings of the same
settings share one probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuner.errors import SpecError

MIB = 1 << 20

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_KNOWN = (
    "backend",
    "expandable_segments",
    "garbage_collection_threshold",
    "max_split_size_mb",
    "roundup_power2_divisions",
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
)
_NO_DEVICE_MEMORY_EFFECT = frozenset(
    {"release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "pinned_num_register_threads"}
)
"""Options that change host memory or locking, never what the device runs out of."""


@dataclass(frozen=True)
class AllocatorSettings:
    """The caching-allocator options that change device memory."""

    expandable_segments: bool = False
    """One growing segment per stream and pool, mapped in pages, instead of one cudaMalloc per
    segment: blocks no longer strand free memory at the ends of segments."""
    max_split_size_bytes: int | None = None
    """Blocks at least this large are never split (None: no limit, PyTorch's default)."""
    roundup_power2_divisions: int = 0
    """Round requests up to one of this many steps between powers of two (0: to 512 bytes)."""
    garbage_collection_threshold: float | None = None
    """Accepted and recorded; it acts only under a per-process memory fraction."""

    @property
    def is_default(self) -> bool:
        """Whether these are PyTorch's defaults (the allocator of a plain `import torch`)."""
        return self == AllocatorSettings()


def parse_alloc_conf(text: str | None) -> AllocatorSettings:
    """The settings of a `PYTORCH_CUDA_ALLOC_CONF` value; None or "" is the default allocator.

    Raises `SpecError` naming the option for an unknown option or a bad value."""
    settings: dict[str, object] = {}
    for option, value in _options(text):
        if option == "backend":
            if value != "native":
                raise SpecError(
                    f"alloc_conf: backend {value!r} is not modelled; only PyTorch's native caching "
                    "allocator ('backend:native', the default) is."
                )
        elif option == "expandable_segments":
            settings["expandable_segments"] = _boolean(option, value)
        elif option == "max_split_size_mb":
            megabytes = _number(option, value)
            if megabytes <= 20:
                raise SpecError(f"alloc_conf: max_split_size_mb must be greater than 20, got {value}.")
            settings["max_split_size_bytes"] = int(megabytes) * MIB
        elif option == "roundup_power2_divisions":
            if value.startswith("["):
                raise SpecError(
                    "alloc_conf: roundup_power2_divisions by size ranges ('[...]') is not modelled; "
                    "give one power of two, e.g. roundup_power2_divisions:4."
                )
            divisions = int(_number(option, value))
            if divisions < 0 or divisions & (divisions - 1):
                raise SpecError(
                    f"alloc_conf: roundup_power2_divisions must be a power of two (or 0), got {value}."
                )
            settings["roundup_power2_divisions"] = divisions
        elif option == "garbage_collection_threshold":
            threshold = _number(option, value)
            if not 0.0 < threshold < 1.0:
                raise SpecError(f"alloc_conf: garbage_collection_threshold must be in (0, 1), got {value}.")
            settings["garbage_collection_threshold"] = threshold
        # Options in _NO_DEVICE_MEMORY_EFFECT are accepted and change nothing modelled.
    return AllocatorSettings(**settings)  # type: ignore[arg-type]


def canonical_alloc_conf(text: str | None) -> str | None:
    """The settings that change device memory, written one way (None for the default allocator):
    `"expandable_segments:True"` for `" expandable_segments : true "`."""
    settings = parse_alloc_conf(text)
    parts = []
    if settings.expandable_segments:
        parts.append("expandable_segments:True")
    if settings.garbage_collection_threshold is not None:
        parts.append(f"garbage_collection_threshold:{settings.garbage_collection_threshold:g}")
    if settings.max_split_size_bytes is not None:
        parts.append(f"max_split_size_mb:{settings.max_split_size_bytes // MIB}")
    if settings.roundup_power2_divisions:
        parts.append(f"roundup_power2_divisions:{settings.roundup_power2_divisions}")
    return ",".join(parts) or None


def _options(text: str | None) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for piece in (text or "").split(","):
        if not piece.strip():
            continue
        option, colon, value = piece.partition(":")
        option, value = option.strip(), value.strip()
        if not colon or not value:
            raise SpecError(
                f"alloc_conf: {piece.strip()!r} must look like 'option:value', e.g. expandable_segments:True."
            )
        if option not in _KNOWN:
            raise SpecError(
                f"alloc_conf: unknown option {option!r}; PyTorch's caching allocator knows "
                f"{', '.join(_KNOWN)}."
            )
        if any(option == seen for seen, _ in found):
            raise SpecError(f"alloc_conf: option {option!r} is given twice.")
        found.append((option, value))
    return found


def _boolean(option: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SpecError(f"alloc_conf: {option} must be True or False, got {value!r}.")


def _number(option: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SpecError(f"alloc_conf: {option} must be a number, got {value!r}.") from None
