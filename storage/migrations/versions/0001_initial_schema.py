"""Initial schema: probe results and their trials, plans, jobs and the plan requests waiting on them.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("status IN ('queued', 'running')")


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "probe_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("workload", sa.JSON(), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=False),
        sa.Column("device_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("torch_version", sa.String(length=64), nullable=False),
        sa.Column("torch_minor", sa.String(length=16), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("gradient_checkpointing", sa.Boolean(), nullable=False),
        sa.Column("max_batch_size", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(length=32), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("memory_line", sa.JSON(), nullable=True),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=True),
        sa.Column("facts", sa.JSON(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.Column("allocator_conf", sa.Text(), nullable=True),
        sa.Column("verified_steps", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_probe_results")),
    )
    op.create_index(
        "ix_probe_results_cache_key",
        "probe_results",
        ["fingerprint", "device_name", "device_memory_bytes", "backend", "torch_minor", "gradient_checkpointing"],
    )

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("probe_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("peak_allocated_bytes", sa.BigInteger(), nullable=True),
        sa.Column("peak_reserved_bytes", sa.BigInteger(), nullable=True),
        sa.Column("num_alloc_retries", sa.Integer(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("samples_per_second", sa.Float(), nullable=True),
        sa.Column("peak_phase", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["probe_id"],
            ["probe_results.id"],
            name=op.f("fk_trials_probe_id_probe_results"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trials")),
        sa.UniqueConstraint("probe_id", "index", name=op.f("uq_trials_probe_id_index")),
    )

    op.create_table(
        "plans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("cache_hit", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("family", sa.String(length=32), nullable=False),
        sa.Column("workload", sa.JSON(), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=False),
        sa.Column("device_memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("effective_batch_size", sa.Integer(), nullable=False),
        sa.Column("world_size", sa.Integer(), nullable=False),
        sa.Column("micro_batch_size", sa.Integer(), nullable=False),
        sa.Column("accumulation_steps", sa.Integer(), nullable=False),
        sa.Column("micro_batch_sizes", sa.JSON(), nullable=True),
        sa.Column("gradient_checkpointing", sa.Boolean(), nullable=False),
        sa.Column("max_micro_batch_size", sa.JSON(), nullable=False),
        sa.Column("memory_budget_bytes", sa.BigInteger(), nullable=False),
        sa.Column("predicted_peak_bytes", sa.BigInteger(), nullable=True),
        sa.Column("predicted_samples_per_second", sa.Float(), nullable=True),
        sa.Column("probe_id", sa.Integer(), nullable=True),
        sa.Column("probe_ids", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("hints", sa.JSON(), nullable=False),
        sa.Column("accumulation_schedule", sa.JSON(), nullable=True),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["probe_id"],
            ["probe_results.id"],
            name=op.f("fk_plans_probe_id_probe_results"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
    )
    op.create_index("ix_plans_created_at", "plans", ["created_at"])
    op.create_index("ix_plans_device_name", "plans", ["device_name"])
    op.create_index("ix_plans_fingerprint", "plans", ["fingerprint"])
    op.create_index("ix_plans_model", "plans", ["model"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=True),
        sa.Column("device_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", _utc(), nullable=False),
        sa.Column("lease_until", _utc(), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("probe_id", sa.Integer(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_jobs_status")
        ),
        sa.ForeignKeyConstraint(
            ["probe_id"],
            ["probe_results.id"],
            name=op.f("fk_jobs_probe_id_probe_results"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_status_lease_until", "jobs", ["status", "lease_until"])
    op.create_index("ix_jobs_status_run_after", "jobs", ["status", "run_after"])
    # One active job per key, on both databases (SQLite has partial indexes since 3.8).
    op.create_index(
        "uq_jobs_active_key", "jobs", ["key"], unique=True, postgresql_where=ACTIVE, sqlite_where=ACTIVE
    )

    op.create_table(
        "job_waiters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("plan_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("resolved_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'resolved', 'failed')", name=op.f("ck_job_waiters_status")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_waiters_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.id"], name=op.f("fk_job_waiters_plan_id_plans"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_waiters")),
    )
    op.create_index("ix_job_waiters_job_id_status", "job_waiters", ["job_id", "status"])


def downgrade() -> None:
    # Dropping a table drops its indexes on both databases.
    op.drop_table("job_waiters")
    op.drop_table("jobs")
    op.drop_table("plans")
    op.drop_table("trials")
    op.drop_table("probe_results")
