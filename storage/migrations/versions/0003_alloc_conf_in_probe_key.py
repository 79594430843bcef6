"""The allocator setting joins the probe cache key: `probe_results.alloc_conf`.

A probe's answer depends on `PYTORCH_CUDA_ALLOC_CONF` (expandable segments fit a larger batch),
so the setting a probe ran under, or modelled, is part of what a cached result answers for.

Upgrade: `alloc_conf` (text, never NULL: '' is PyTorch's default allocator, so that the unique
index treats two default-allocator results as equal on both databases) takes the value of
`allocator_conf`, which is dropped; the unique cache-key index is rebuilt with it.
Downgrade restores `allocator_conf` (NULL for '') and the previous index. Results that differ
only in their allocator setting cannot share the old key: of those, the oldest stays complete and
the others become superseded, as migration 0002 did.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ["fingerprint", "device_name", "device_memory_bytes", "backend", "torch_minor", "gradient_checkpointing"]
NEW_KEY = [*OLD_KEY, "alloc_conf"]
COMPLETE = sa.text("status = 'complete'")

probe_results = sa.table(
    "probe_results",
    sa.column("id", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("status", sa.String(16)),
    sa.column("allocator_conf", sa.Text()),
    sa.column("alloc_conf", sa.String(500)),
    *(sa.column(name) for name in OLD_KEY),
)


def upgrade() -> None:
    op.add_column(
        "probe_results", sa.Column("alloc_conf", sa.String(length=500), nullable=False, server_default="")
    )
    op.execute(
        probe_results.update().values(alloc_conf=sa.func.coalesce(probe_results.c.allocator_conf, ""))
    )
    op.drop_column("probe_results", "allocator_conf")
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        NEW_KEY,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    key = [probe_results.c[name] for name in OLD_KEY]
    complete = probe_results.c.status == "complete"
    repeated = sa.select(*key).where(complete).group_by(*key).having(sa.func.count() > 1)
    for values in bind.execute(repeated).all():
        same_key = [column == value for column, value in zip(key, values, strict=True)]
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
    op.add_column("probe_results", sa.Column("allocator_conf", sa.Text(), nullable=True))
    op.execute(
        probe_results.update().values(allocator_conf=sa.func.nullif(probe_results.c.alloc_conf, ""))
    )
    op.drop_column("probe_results", "alloc_conf")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        OLD_KEY,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )
