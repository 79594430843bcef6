"""Reads the API needs that `storage.repository` does not offer as functions.

Kept small and read-only; each returns plain values or the repository's domain types.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from storage import repository
from storage.db import write_transaction
from storage.models import WAITER_PENDING, WAITER_RESOLVED, JobWaiterRow, PlanRow, ProbeRow, utcnow
from tuner.results import Plan


def find_identical_plan(
    session: Session, *, fingerprint: str, request: dict[str, Any], probe_ids: dict[str, int]
) -> Plan | None:
    """The newest stored plan made for exactly this canonical request from these probes."""
    workload_plans = (
        select(PlanRow.id, PlanRow.request, PlanRow.probe_ids)
        .where(
            PlanRow.fingerprint == fingerprint,
            PlanRow.backend == request["backend"],
            PlanRow.effective_batch_size == request["effective_batch_size"],
            PlanRow.world_size == request["world_size"],
            PlanRow.device_name == (request.get("device") or {}).get("name", ""),
        )
        .order_by(PlanRow.id.desc())
    )
    for plan_id, stored_request, stored_probe_ids in session.execute(workload_plans):
        if stored_request == request and {k: int(v) for k, v in stored_probe_ids.items()} == probe_ids:
            found: Plan = repository.get_plan(session, plan_id=plan_id)
            return found
    return None


def probe_totals(session: Session) -> dict[str, tuple[int, float]]:
    """Stored probe results and the seconds they took, by backend."""
    rows = session.execute(
        select(
            ProbeRow.backend, func.count(ProbeRow.id), func.coalesce(func.sum(ProbeRow.seconds), 0.0)
        ).group_by(ProbeRow.backend)
    )
    return {backend: (int(count), float(seconds)) for backend, count, seconds in rows}


def resolve_waiter(session: Session, *, waiter_id: int, plan_id: int) -> bool:
    """Resolve a pending waiter to an existing plan (the identical request's); False when the
    waiter was no longer pending (resolved or failed meanwhile)."""
    with write_transaction(session) as db:
        result = db.execute(
            update(JobWaiterRow)
            .where(JobWaiterRow.id == waiter_id, JobWaiterRow.status == WAITER_PENDING)
            .values(status=WAITER_RESOLVED, plan_id=plan_id, resolved_at=utcnow())
        )
        return bool(getattr(result, "rowcount", 0))
