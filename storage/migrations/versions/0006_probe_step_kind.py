"""The probe's step kind joins the probe cache key (`probe_results.step`); plans keep their eval
micro-batch and token budget (`plans.eval_and_tokens`).

A probe runs the canonical train step (`train`) or the eval step (`eval`: forward only under
`torch.no_grad()` with the training state resident); the two answer different questions for the
same workload, so the kind is part of what a cached result answers for.

Upgrade: `step` (text, never NULL, `train` for every stored result: each ran the train step) is
added and the unique cache-key index rebuilt with it; `plans.eval_and_tokens` (JSON, NULL for
every stored plan: none had either) is added. Downgrade drops the column, the eval results (the
old key cannot tell them from train results) and restores the previous index.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
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
]
NEW_KEY = [*OLD_KEY, "step"]
COMPLETE = sa.text("status = 'complete'")

probe_results = sa.table("probe_results", sa.column("id", sa.Integer()), sa.column("step", sa.String(16)))
trials = sa.table("trials", sa.column("probe_id", sa.Integer()))


def upgrade() -> None:
    op.add_column(
        "probe_results", sa.Column("step", sa.String(length=16), nullable=False, server_default="train")
    )
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        NEW_KEY,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )
    op.add_column("plans", sa.Column("eval_and_tokens", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("plans", "eval_and_tokens")
    op.drop_index("uq_probe_results_cache_key", table_name="probe_results")
    # Eval results and their trials go (plans that named one keep a dangling id, as after 0003).
    evaluated = sa.select(probe_results.c.id).where(probe_results.c.step != "train")
    op.execute(trials.delete().where(trials.c.probe_id.in_(evaluated)))
    op.execute(probe_results.delete().where(probe_results.c.step != "train"))
    op.drop_column("probe_results", "step")
    op.create_index(
        "uq_probe_results_cache_key",
        "probe_results",
        OLD_KEY,
        unique=True,
        postgresql_where=COMPLETE,
        sqlite_where=COMPLETE,
    )
