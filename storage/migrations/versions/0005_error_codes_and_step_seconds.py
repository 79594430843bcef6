"""A failed job's (and waiter's) error code in a column of its own; each trial's step time.

Until now a client-fault error was stored as `<code>: <sentence>` in `error` and recovered by
splitting the text, so a service failure whose sentence happened to start with a code read as the
client's. The code now has its column (`error_code`, NULL for a failure of the service); stored
errors of the client-fault codes of the time are split into the two columns.

`trials.step_seconds` keeps what `Trial.step_seconds` says (the steady iteration's wall time):
without it a probe read back was not the probe stored. `trials.move` keeps why the guided search
ran each trial (`tuner.search_types.Move`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The client-fault codes when this migration was written (tuner.errors.CLIENT_FAULT_CODES).
_CODES = (
    "invalid_spec",
    "model_build_failed",
    "estimate_failed",
    "nothing_fits",
    "plan_impossible",
    "device_required",
)
_TABLES = ("jobs", "job_waiters")


def upgrade() -> None:
    op.add_column("trials", sa.Column("step_seconds", sa.Float(), nullable=True))
    op.add_column("trials", sa.Column("move", sa.String(length=16), nullable=True))
    for table in _TABLES:
        op.add_column(table, sa.Column("error_code", sa.String(length=64), nullable=True))
        for code in _CODES:
            prefix = f"{code}: "
            op.execute(
                sa.text(
                    f"UPDATE {table} SET error_code = :code, error = substr(error, :start) "
                    "WHERE error_code IS NULL AND substr(error, 1, :length) = :prefix"
                ).bindparams(code=code, start=len(prefix) + 1, length=len(prefix), prefix=prefix)
            )


def downgrade() -> None:
    for table in _TABLES:
        op.execute(
            sa.text(
                f"UPDATE {table} SET error = error_code || ': ' || error "
                "WHERE error_code IS NOT NULL AND error IS NOT NULL"
            )
        )
        # A plain DROP COLUMN (SQLite ≥ 3.35): a batch rebuild of `jobs` would cascade-delete
        # the waiters of every job.
        op.drop_column(table, "error_code")
    op.drop_column("trials", "step_seconds")
    op.drop_column("trials", "move")
