"""A probe job's payload: what the API queues with a job and a worker reads back to run it.

Pure pydantic, no torch, no SQL. `storage.planning.job_payload` builds it from a plan request and
the API stores `JobPayload.stored()` in the job's row; the worker (`probes.worker`) and the API's
view of a job read the row back with `JobPayload.model_validate`. Storage and probes may not import
each other, so the one definition lives here, in the domain both import.

The stored JSON keeps the keys earlier versions stored, so that stored rows stay readable both
ways: a payload queued before parallelism or extra probes existed has neither key and reads as a
single process with no extra probes, and `stored()` leaves `extra_probes` out where there are none.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tuner.errors import SpecError
from tuner.parallelism import SINGLE, ParallelSetup
from tuner.plan_probes import ProbeRole
from tuner.settings import get_settings
from tuner.spec import (
    INTAKE,
    Backend,
    DeviceSpec,
    StepKind,
    WorkloadSpec,
    format_validation_error,
    refuse_unlisted_factory,
)

__all__ = ["ExtraProbe", "JobPayload", "parse_job_payload"]


class _Payload(BaseModel):
    # Keys a newer version adds are ignored, as a worker reading the dict ignored them, so that a
    # worker not yet upgraded still runs the jobs a newer API queues.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ExtraProbe(_Payload):
    """One probe beyond the train probes (`tuner.plan_probes`): the eval probe, or a token
    budget's length, which the worker runs after the train probes."""

    workload: WorkloadSpec
    gradient_checkpointing: bool
    step: StepKind = "train"
    role: ProbeRole = "train"


class JobPayload(_Payload):
    """What a worker needs to run a job: the workload, the device, the backend, the
    checkpointing choices to probe, the torch minor and allocator setting the API keyed the
    probes by, the data-parallel job one rank of which is probed, and the extra probes."""

    workload: WorkloadSpec
    """The train probes' workload (every sample at `seq_len`: `tuner.plan_probes.probed_workload`)."""
    device: DeviceSpec | None = None
    """None: a cuda job for whichever GPU the worker has."""
    backend: Backend
    gradient_checkpointing: tuple[bool, ...]
    """The checkpointing choices to probe, off first."""
    torch_minor: str | None = None
    """The torch minor the API keyed the probes by (None: the worker's own)."""
    alloc_conf: str | None = None
    parallel: ParallelSetup = SINGLE
    """Absent from jobs queued before parallelism was part of them: a single process."""
    extra_probes: tuple[ExtraProbe, ...] = ()
    """Absent from jobs queued before extra probes existed, and from jobs without any."""

    def stored(self) -> dict[str, Any]:
        """The JSON stored in the job's row: the keys earlier versions stored, `extra_probes`
        only where there are some."""
        data: dict[str, Any] = self.model_dump(mode="json")
        if not self.extra_probes:
            del data["extra_probes"]
        return data

    def workloads(self) -> list[WorkloadSpec]:
        """Every workload the job probes: the train probes', then each extra probe's."""
        return [self.workload, *(extra.workload for extra in self.extra_probes)]


def parse_job_payload(data: Any, *, allowed_factory_packages: Collection[str] | None = None) -> JobPayload:
    """A stored payload taken in by the worker that is to run it: its workloads checked as a
    user's are (`tuner.spec.INTAKE`, and a `python` factory only from `allowed_factory_packages`,
    default this process's `TUNER_ALLOWED_FACTORY_PACKAGES`), since this process imports and
    builds them. Anything that does not validate is a `SpecError`: retrying cannot fix it."""
    try:
        payload = JobPayload.model_validate(data, context=INTAKE)
    except ValidationError as exc:
        raise SpecError(f"Invalid job payload: {format_validation_error(exc)}") from None
    allowed = (
        get_settings().allowed_factory_package_set
        if allowed_factory_packages is None
        else allowed_factory_packages
    )
    for workload in payload.workloads():
        refuse_unlisted_factory(workload, allowed)
    return payload
