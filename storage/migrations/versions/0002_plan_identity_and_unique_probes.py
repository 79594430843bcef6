"""Plan identity and unique probe results: `plans.request_hash` (unique) and a unique cache key.

Upgrade:
- `plans.request_hash` is added and computed for every existing plan (`storage.identity`; the
  function is copied below, frozen, so that this migration keeps doing what it did). Plans whose
  identity repeats an older plan's keep their rows (clients and waiters may hold their ids) but
  not the identity: the oldest (by `created_at`, then `id`) gets the hash, the others NULL.
- Probe results: of several complete results with one cache key, the oldest stays `complete`;
  the others become `superseded` (still readable by id, never a cache hit). The plain cache-key
  index is replaced by a unique one over complete results.

Downgrade drops both unique indexes and the column, marks superseded results complete again and
restores the plain cache-key index: the 0001 schema with every row kept.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CACHE_KEY = ["fingerprint", "device_name", "device_memory_bytes", "backend", "torch_minor", "gradient_checkpointing"]
COMPLETE = sa.text("status = 'complete'")

# Lightweight tables: the migration must not depend on the models, which move on.
plans = sa.table(
    "plans",
    sa.column("id", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("request", sa.JSON()),
    sa.column("probe_ids", sa.JSON()),
    sa.column("request_hash", sa.String(64)),
)
probe_results = sa.table(
    "probe_results",
    sa.column("id", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("status", sa.String(16)),
    *(sa.column(name) for name in CACHE_KEY),
)


def _plan_request_hash(request: dict[str, Any], probe_ids: dict[str, Any]) -> str:
    """`storage.identity.plan_request_hash` as of this revision."""
    document = {"probe_ids": {str(k): int(v) for k, v in probe_ids.items()}, "request": dict(request)}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def upgrade() -> None:
    bind = op.get_bind()

    op.add_column("plans", sa.Column("request_hash", sa.String(length=64), nullable=True))
    seen: set[str] = set()
    oldest_first = sa.select(plans.c.id, plans.c.request, plans.c.probe_ids).order_by(
        plans.c.created_at, plans.c.id
    )
    for plan_id, request, probe_ids in bind.execute(oldest_first).all():
        identity = _plan_request_hash(request or {}, probe_ids or {})
        if identity in seen:
            continue  # a younger duplicate: keeps its row, not the identity
        seen.add(identity)
        bind.execute(plans.update().where(plans.c.id == plan_id).values(request_hash=identity))
    op.create_index("uq_plans_request_hash", "plans", ["request_hash"], unique=True)

    key = [probe_results.c[name] for name in CACHE_KEY]
    complete = probe_results.c.status == "complete"
    repeated_keys = sa.select(*key).where(complete).group_by(*key).having(sa.func.count() > 1)
    for values in bind.execute(repeated_keys).all():
        same_key = [column == value for column, value in zip(key, values, strict=True)]
        # The oldest by creation time (an uploaded result carries its own), then by id.
        oldest = bind.execute(
            sa.select(probe_results.c.id)
            .where(*same_key, complete)
            .order_by(probe_results.c.created_at, probe_results.c.id)
            .limit(1)
        ).scalar_one()
        bind.execute(
            probe_results.update()
            .where(*same_key, complete, probe_results.c.id != oldest)
            .values(status="superseded")
        )
    op.drop_index("ix_probe_results_cache_key", table_name="probe_results")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        CACHE_KEY,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )


def downgrade() -> None:
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    op.execute(probe_results.update().where(probe_results.c.status == "superseded").values(status="complete"))
    op.create_index("ix_probe_results_cache_key", "probe_results", CACHE_KEY)

    op.drop_index("uq_plans_request_hash", table_name="plans")
    # SQLite 3.35+ drops an unindexed column in place: no batch rebuild of `plans`, whose
    # rebuild would run the ON DELETE actions of `job_waiters.plan_id`.
    op.drop_column("plans", "request_hash")
