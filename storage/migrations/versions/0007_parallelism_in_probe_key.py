"""The data-parallel job joins the probe cache key: `probe_results.parallelism`.

One rank of a DDP job holds the reducer's buckets beside the gradients; one rank of an FSDP job
holds a share of the model that depends on the world size. So the strategy, its options and,
for FSDP, the world size a probe traced or ran under are part of what a cached result answers
for (`tuner.parallelism.ParallelismSpec.probe_key`).

Upgrade: `parallelism` (text, never NULL: '' is a single process, which every earlier result
was) is added, and the unique cache-key index is rebuilt with it; `plans.memory_per_rank` (JSON,
NULL for earlier plans) keeps one rank's bytes per category. Downgrade drops it and restores
the previous index; results that differ only in their parallelism cannot share the old key: of
those, the single-process one (else the oldest) stays complete and the others become superseded,
as migrations 0002 and 0003 did.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = [
    "fingerprint",
    "device_name",
    "device_memory_bytes",
    "backend",
    "torch_minor",
    "gradient_checkpointing",
    "alloc_conf",
    "step",
]
NEW_KEY = [*OLD_KEY, "parallelism"]
COMPLETE = sa.text("status = 'complete'")

probe_results = sa.table(
    "probe_results",
    sa.column("id", sa.Integer()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("status", sa.String(16)),
    sa.column("parallelism", sa.String(500)),
    *(sa.column(name) for name in OLD_KEY),
)


def _rebuild_index(columns: list[str]) -> None:
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        columns,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )


def upgrade() -> None:
    op.add_column(
        "probe_results", sa.Column("parallelism", sa.String(length=500), nullable=False, server_default="")
    )
    _rebuild_index(NEW_KEY)
    op.add_column("plans", sa.Column("memory_per_rank", sa.JSON(), nullable=True))


def downgrade() -> None:
    bind = op.get_bind()
    key = [probe_results.c[name] for name in OLD_KEY]
    complete = probe_results.c.status == "complete"
    repeated = sa.select(*key).where(complete).group_by(*key).having(sa.func.count() > 1)
    for values in bind.execute(repeated).all():
        same_key = [column == value for column, value in zip(key, values, strict=True)]
        keeper = bind.execute(
            sa.select(probe_results.c.id)
            .where(*same_key, complete)
            # A single process ('' sorts first), else the oldest.
            .order_by(probe_results.c.parallelism, probe_results.c.created_at, probe_results.c.id)
            .limit(1)
        ).scalar_one()
        bind.execute(
            probe_results.update()
            .where(*same_key, complete, probe_results.c.id != keeper)
            .values(status="superseded")
        )
    _rebuild_index(OLD_KEY)
    op.drop_column("probe_results", "parallelism")
    op.drop_column("plans", "memory_per_rank")
