"""The options `tuner plan` and `tuner probe` share: which backend runs the trials, and the
target device given by `--device-memory/--device-name`."""

from __future__ import annotations

import functools
from enum import StrEnum
from typing import TYPE_CHECKING

from tuner.cli._common import fail
from tuner.search_types import DEFAULT_MAX_TRIALS

if TYPE_CHECKING:
    from tuner.parallelism import ParallelSetup
    from tuner.spec import Backend, DeviceSpec

MAX_TRIALS = DEFAULT_MAX_TRIALS
"""A probe's trial budget unless `--max-trials` says otherwise."""
PARALLELISM_HELP = (
    "none, ddp or fsdp, with options after a colon: ddp:gradient_as_bucket_view=true,bucket_cap_mb=50, "
    "fsdp:reshard_after_forward=false,param_dtype=bf16 (default: ddp with --world-size above 1, else none)."
)
ALLOC_CONF_HELP = (
    "The PYTORCH_CUDA_ALLOC_CONF the run will use, e.g. expandable_segments:True "
    "(default: this environment's)."
)


class BackendChoice(StrEnum):
    cuda = "cuda"
    estimate = "estimate"

    @property
    def backend(self) -> Backend:
        return "cuda" if self is BackendChoice.cuda else "estimate"


@functools.cache
def local_gpu() -> DeviceSpec | None:
    """This machine's first CUDA GPU. Looked for once per process: the check spawns a child."""
    from probes.local_gpu import detect_local_gpu

    return detect_local_gpu()


def resolve_backend(
    choice: BackendChoice | None, total_memory: int | None, *, no_gpu_error: str | None = None
) -> Backend:
    """The `--backend` choice; else estimate for a target `--device-memory`; else cuda on this
    machine's GPU. Without a GPU: estimate, or `no_gpu_error` as the command's error when given."""
    if choice is not None:
        return choice.backend
    if total_memory is not None:
        return "estimate"
    if local_gpu() is not None:
        return "cuda"
    if no_gpu_error is not None:
        fail(no_gpu_error)
    return "estimate"


def target_device(total_memory: int | None, name: str | None) -> DeviceSpec | None:
    """The device of `--device-memory` (named by `--device-name`), or None without it."""
    from tuner.spec import DeviceSpec
    from tuner.units import format_bytes

    if total_memory is None:
        if name is not None:
            fail("--device-name needs --device-memory as well.")
        return None
    return DeviceSpec(name=name or f"GPU with {format_bytes(total_memory)}", total_memory_bytes=total_memory)


def parallelism_option(text: str | None, world_size: int) -> ParallelSetup:
    """`--parallelism` at `--world-size` as one rank's setup; a bad value is a one-line error
    naming the option and the field."""
    from pydantic import ValidationError

    from tuner.parallelism import ParallelismSpec, ParallelSetup, default_parallelism, parse_parallelism_text
    from tuner.spec import format_validation_error

    if world_size < 1:
        fail(f"--world-size must be at least 1, got {world_size}.")
    if text is None:
        return ParallelSetup(parallelism=default_parallelism(world_size), world_size=world_size)
    try:
        spec = ParallelismSpec.model_validate(parse_parallelism_text(text)).canonical()
    except ValueError as exc:
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        fail(f"--parallelism: {message.removeprefix('parallelism.')}")
    return ParallelSetup(parallelism=spec, world_size=world_size)


def alloc_conf_option(text: str | None) -> str | None:
    """`--alloc-conf` in canonical form; a bad setting is a one-line error naming the option."""
    from tuner.alloc_conf import canonical_alloc_conf
    from tuner.errors import SpecError

    try:
        return canonical_alloc_conf(text)
    except SpecError as exc:
        fail(f"--alloc-conf: {exc.message.removeprefix('alloc_conf: ')}")
