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

from sqlalchemy.orm import Session

from storage import repository
from tuner.errors import ConflictError, NotFoundError, SpecError
from tuner.results import ProbeResult


def same_result(a: ProbeResult, b: ProbeResult) -> bool:
    """Same answer from the same trials (timings and peaks may differ in the last digits)."""
    return (
        a.max_batch_size == b.max_batch_size
        and a.gradient_checkpointing == b.gradient_checkpointing
        and [(t.batch_size, t.ok) for t in a.trials] == [(t.batch_size, t.ok) for t in b.trials]
    )


def store_uploaded_probe(session: Session, *, result: ProbeResult) -> tuple[ProbeResult, bool]:
    """The stored result and whether this call created it."""
    if result.fingerprint != result.workload.fingerprint():
        raise SpecError(
            f"fingerprint {result.fingerprint!r} is not the workload's fingerprint "
            f"({result.workload.fingerprint()!r}); send the workload's own fingerprint."
        )
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
            if _key(named) == _key(result) and same_result(named, result):
                return named, False
            raise ConflictError(
                f"Probe result {result.id} is stored with different content; "
                "leave out 'id' to store a new result."
            )
    existing = repository.find_cached_probe(
        session,
        fingerprint=result.fingerprint,
        device_name=result.device.name,
        device_memory_bytes=result.device.total_memory_bytes,
        backend=result.backend,
        torch_minor=minor,
        gradient_checkpointing=result.gradient_checkpointing,
        alloc_conf=result.alloc_conf,
        step=result.step,
    )
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
        f"setting {result.alloc_conf or 'default'} ({result.step} step), with "
        f"max_batch_size {existing.max_batch_size} (this one: {result.max_batch_size})."
    )


def _key(probe: ProbeResult) -> tuple[object, ...]:
    return (
        probe.fingerprint,
        probe.device,
        probe.backend,
        repository.torch_minor(probe.versions.get("torch")),
        probe.gradient_checkpointing,
        probe.alloc_conf,
        probe.step,
    )
