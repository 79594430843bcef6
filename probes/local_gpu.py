"""Which GPU a worker serves, found in a spawned child process.

The worker's own process never touches CUDA: creating a context there would take memory on the
very GPU its probes measure, and a probe child could not use a clean device.
"""

from __future__ import annotations

import logging

from probes.child import ChildFailed, run_in_child
from tuner.errors import ProbeError
from tuner.spec import DeviceSpec

log = logging.getLogger(__name__)


def _query_first_gpu() -> tuple[str, int, int] | None:
    """(name, total memory, visible GPUs) of GPU 0, or None without CUDA. Runs in the child."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return str(props.name), int(props.total_memory), int(torch.cuda.device_count())


def detect_local_gpu(*, timeout: float = 180.0) -> DeviceSpec | None:
    """The first visible CUDA GPU as a `DeviceSpec`, or None when this machine has none."""
    try:
        found = run_in_child(_query_first_gpu, timeout=timeout, what="CUDA GPU check")
    except ChildFailed as exc:
        raise ProbeError(f"Could not check for a CUDA GPU: {exc.message}") from None
    if found is None:
        return None
    name, total_memory, visible = found
    if visible > 1:
        log.warning(
            "%d GPUs are visible; this worker uses only the first. Run one worker per GPU with "
            "CUDA_VISIBLE_DEVICES set to its index.",
            visible,
        )
    return DeviceSpec(name=name, total_memory_bytes=total_memory)
