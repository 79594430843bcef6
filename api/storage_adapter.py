"""Reads the API needs that `storage.repository` does not offer as functions.

Kept small and read-only; each returns plain values or the repository's domain types.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import ProbeRow


def probe_totals(session: Session) -> dict[str, tuple[int, float]]:
    """Stored probe results and the seconds they took, by backend."""
    rows = session.execute(
        select(
            ProbeRow.backend, func.count(ProbeRow.id), func.coalesce(func.sum(ProbeRow.seconds), 0.0)
        ).group_by(ProbeRow.backend)
    )
    return {backend: (int(count), float(seconds)) for backend, count, seconds in rows}
