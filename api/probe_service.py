"""Storing a probe result measured elsewhere (`POST /v1/probes`), with its conflict rule.

The cache key of a probe is (fingerprint, device name and memory, backend, torch minor,
checkpointing). A result whose key already has a stored result is the same result when its largest
batch and its trials (batch size and outcome, in order) agree: the upload is then idempotent. Any
other difference is a conflict (409): plans were derived from the stored one.

The rule holds under a race: the database keeps one complete result per cache key (a unique
index), and `repository.save_probe_or_existing` inserts atomically. Of several uploads racing for
one key, exactly one creates the row (201); each other one is compared with the row that won, as
if it had arrived after it (200 or 409).
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy.orm import Session

from storage import repository
from tuner.errors import ConflictError, NotFoundError, SpecError
from tuner.probe_key import ProbeKey
from tuner.results import ProbeResult
from tuner.spec import refuse_unlisted_factory


def same_result(a: ProbeResult, b: ProbeResult) -> bool:
    """Same answer from the same trials (timings and peaks may differ in the last digits)."""
    return (
        a.max_batch_size == b.max_batch_size
        and a.gradient_checkpointing == b.gradient_checkpointing
        and [(t.batch_size, t.ok) for t in a.trials] == [(t.batch_size, t.ok) for t in b.trials]
    )


def store_uploaded_probe(
    session: Session, *, result: ProbeResult, allowed_factory_packages: Collection[str]
) -> tuple[ProbeResult, bool]:
    """The stored result and whether this call created it. A `python` factory must be in one of
    `allowed_factory_packages` (the app's setting), as for a plan request."""
    refuse_unlisted_factory(result.workload, allowed_factory_packages, field="workload.model")
    if result.fingerprint != result.workload.fingerprint():
        raise SpecError(
            f"fingerprint {result.fingerprint!r} is not the workload's fingerprint "
            f"({result.workload.fingerprint()!r}); send the workload's own fingerprint."
        )
    refuse_unmeasured(result)
    torch_version = result.versions.get("torch")
    minor = repository.torch_minor(torch_version)
    if minor == repository.UNKNOWN_TORCH:
        raise SpecError(
            'versions.torch must name the torch version that measured the result (e.g. "2.13.0"): '
            "the cache is keyed by its minor release."
        )
    if result.id is not None:
        try:
            named = repository.get_probe(session, probe_id=result.id)
        except NotFoundError:
            named = None
        if named is not None:
            if ProbeKey.of_result(named) == ProbeKey.of_result(result) and same_result(named, result):
                return named, False
            raise ConflictError(
                f"Probe result {result.id} is stored with different content; "
                "leave out 'id' to store a new result."
            )
    existing = repository.find_cached_probe(session, ProbeKey.of_result(result))
    if existing is None:
        # Nothing stored a moment ago; another upload may still store first, and then the
        # insert finds its row instead of making a second one.
        probe_id, created = repository.save_probe_or_existing(
            session, result=result.model_copy(update={"id": None, "created_at": None})
        )
        existing = repository.get_probe(session, probe_id=probe_id)
        if created:
            return existing, True
    if same_result(existing, result):
        return existing, False
    raise ConflictError(
        f"Probe result {existing.id} is already stored for this workload, device, backend, torch "
        f"{minor}, checkpointing {'on' if result.gradient_checkpointing else 'off'} and allocator "
        f"setting {result.alloc_conf or 'default'}, with "
        f"max_batch_size {existing.max_batch_size} (this one: {result.max_batch_size})."
    )


def refuse_unmeasured(result: ProbeResult) -> None:
    """A result that does not measure the device it names is not stored: a CPU run (autotune
    without CUDA), or a cuda result whose passing trials carry no peak memory (what a CPU run
    labelled cuda looks like: it ran, but measured nothing of the GPU)."""
    if result.backend == "cpu":
        raise SpecError(
            f"backend: a probe run on CPU is no measurement of {result.device.name} and is not stored; "
            "run autotune on that GPU."
        )
    if result.backend == "cuda":
        unmeasured = [t.batch_size for t in result.trials if t.ok and t.peak_reserved_bytes is None]
        if unmeasured:
            raise SpecError(
                f"trials: a cuda result needs the peak memory of every passing trial (peak_reserved_bytes), "
                f"and the trials at batch sizes {unmeasured[:5]} have none; a run that measured no GPU "
                "memory is not stored as that GPU's."
            )

