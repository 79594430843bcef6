"""The probe cache key: what a probe result is stored, found and queued by.

One probe answers one question: the largest micro-batch of one workload (its fingerprint) on one
device (name and memory), measured by one backend with one torch minor release, with or without
gradient checkpointing, under one allocator setting, of one step kind (a training step, or an eval
step: forward only with the training state resident), for one data-parallel setup (one rank of a
DDP job, or of an FSDP job at one world size). Storage (the unique index and the lookup),
the API (the cache lookup and the conflict rule of an upload) and the worker (a probe a lost job
stored already) all use this one value; the job key of a request is built from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuner.results import ProbeResult
    from tuner.spec import DeviceSpec, WorkloadSpec

UNKNOWN_TORCH = "unknown"
"""The torch minor of a result that names no torch version."""
_MINOR = re.compile(r"^\s*(\d+)\.(\d+)")


def torch_minor(version: str | None) -> str:
    """The minor release of a torch version, part of the cache key: `2.13.1+cu126` → `2.13`."""
    match = _MINOR.match(version or "")
    return f"{match.group(1)}.{match.group(2)}" if match else UNKNOWN_TORCH


@dataclass(frozen=True)
class ProbeKey:
    """The cache key of one probe result (the field names are the `probe_results` columns)."""

    fingerprint: str
    device_name: str
    device_memory_bytes: int
    backend: str
    torch_minor: str
    """`2.13` for torch 2.13.1+cu126 (a patch release keeps memory behaviour)."""
    gradient_checkpointing: bool
    alloc_conf: str | None = None
    """The canonical `PYTORCH_CUDA_ALLOC_CONF` (`tuner.alloc_conf.canonical_alloc_conf`); None is
    PyTorch's default allocator."""
    step: str = "train"
    """The step kind measured (`tuner.spec.StepKind`): `train` or `eval`."""
    parallelism: str = ""
    """The data-parallel setup's probe key (`tuner.parallelism.ParallelSetup.probe_key`): '' for
    a single process, else the strategy and its options (and FSDP's world size)."""

    @classmethod
    def of(
        cls,
        workload: WorkloadSpec,
        device: DeviceSpec,
        *,
        backend: str,
        torch_minor: str,
        gradient_checkpointing: bool,
        alloc_conf: str | None,
        step: str = "train",
        parallelism: str = "",
    ) -> ProbeKey:
        """The key of the probe of `workload` on `device` that a plan request or a job needs."""
        return cls(
            fingerprint=workload.fingerprint(),
            device_name=device.name,
            device_memory_bytes=device.total_memory_bytes,
            backend=backend,
            torch_minor=torch_minor,
            gradient_checkpointing=gradient_checkpointing,
            alloc_conf=alloc_conf,
            step=step,
            parallelism=parallelism,
        )

    @classmethod
    def of_result(cls, result: ProbeResult) -> ProbeKey:
        """The key a probe result is stored under (its torch minor from `versions["torch"]`)."""
        return cls(
            fingerprint=result.fingerprint,
            device_name=result.device.name,
            device_memory_bytes=result.device.total_memory_bytes,
            backend=result.backend,
            torch_minor=torch_minor(result.versions.get("torch")),
            gradient_checkpointing=result.gradient_checkpointing,
            alloc_conf=result.alloc_conf,
            step=result.step,
            parallelism=result.parallelism,
        )

    def texts(self) -> tuple[str | None, ...]:
        """The key's text parts (what a database may be unable to hold, e.g. a NUL character)."""
        return (
            self.fingerprint,
            self.device_name,
            self.backend,
            self.torch_minor,
            self.alloc_conf,
            self.parallelism,
        )


PROBE_KEY_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(ProbeKey))
"""The key's parts in order: the columns of the unique cache-key index."""
