"""SQLAlchemy 2.0 models: probe results with their trials, plans, probe jobs and the plan requests
waiting on them.

The same models serve SQLite (the embedded default) and PostgreSQL (a fleet): portable column
types only (`JSON`, `BigInteger`, timezone-aware UTC datetimes), and a partial unique index that
both databases support. The Alembic migrations in `storage/migrations/versions/` must match these
models exactly; a test runs autogenerate against both databases and expects no difference.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from tuner.job_status import (
    ACTIVE_JOB_STATUSES,
    JOB_QUEUED,
    JOB_STATUSES,
    WAITER_PENDING,
    WAITER_STATUSES,
    sql_in,
)
from tuner.probe_key import PROBE_KEY_FIELDS

PROBE_COMPLETE = "complete"
PROBE_SUPERSEDED = "superseded"
"""A probe result that an older one of the same cache key replaced when migration 0002 made the
cache key unique. It stays readable by id (plans name it), but no cache lookup returns it."""

# The condition of the unique cache-key index: only results a lookup may return are unique.
PROBE_CURRENT = text("status = 'complete'")

PROBE_KEY_COLUMNS = PROBE_KEY_FIELDS
"""The columns of the probe cache key (`tuner.probe_key.ProbeKey`): unique among complete results."""
DEFAULT_ALLOC_CONF = ""
"""`probe_results.alloc_conf` of PyTorch's default allocator (None in `ProbeResult`): a key
column is never NULL, so that the unique index sees two default-allocator results as equal."""

# Stable constraint names on both databases, so that later migrations can name what they alter.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both databases.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as naive UTC
    text (which sorts and compares correctly) and come back timezone-aware.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given where a timezone-aware one is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ProbeRow(Base):
    """One probe result: the largest micro-batch of a workload on a device, per checkpointing choice."""

    __tablename__ = "probe_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=PROBE_COMPLETE)
    fingerprint: Mapped[str] = mapped_column(String(64))
    workload: Mapped[dict[str, Any]] = mapped_column(JSON)
    device_name: Mapped[str] = mapped_column(String(200))
    device_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    backend: Mapped[str] = mapped_column(String(16))
    torch_version: Mapped[str] = mapped_column(String(64))
    torch_minor: Mapped[str] = mapped_column(String(16))
    """`2.13` for torch 2.13.1+cu126: part of the cache key (a patch release keeps memory behaviour)."""
    versions: Mapped[dict[str, str]] = mapped_column(JSON)
    gradient_checkpointing: Mapped[bool] = mapped_column(Boolean)
    max_batch_size: Mapped[int] = mapped_column(Integer)
    stop_reason: Mapped[str] = mapped_column(String(32))
    strategy: Mapped[str] = mapped_column(String(32))
    memory_line: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON)
    alloc_conf: Mapped[str] = mapped_column(String(500), default=DEFAULT_ALLOC_CONF, server_default="")
    """The canonical `PYTORCH_CUDA_ALLOC_CONF` the probe assumed ('' for the default allocator)."""
    step: Mapped[str] = mapped_column(String(16), default="train", server_default="train")
    """The step the trials ran: `train` or `eval` (migration 0006)."""
    parallelism: Mapped[str] = mapped_column(String(500), default="", server_default="")
    """The data-parallel job one rank of which was probed, as `ParallelismSpec.probe_key` ('' for
    a single process; FSDP's names its world size)."""
    verified_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)

    trials: Mapped[list[TrialRow]] = relationship(
        back_populates="probe",
        order_by="TrialRow.index",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        # The cache key identifies one complete result: two racing uploads or workers meet here
        # (`save_probe` inserts with ON CONFLICT DO NOTHING), and the cache lookup uses it.
        Index(
            "uq_probe_results_cache_key",
            *PROBE_KEY_COLUMNS,
            unique=True,
            postgresql_where=PROBE_CURRENT,
            sqlite_where=PROBE_CURRENT,
        ),
    )


class TrialRow(Base):
    """One trial of a probe: the train step at one batch size."""

    __tablename__ = "trials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    probe_id: Mapped[int] = mapped_column(ForeignKey("probe_results.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    """Position in the order the search ran the trials."""
    batch_size: Mapped[int] = mapped_column(Integer)
    ok: Mapped[bool] = mapped_column(Boolean)
    peak_allocated_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    peak_reserved_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    num_alloc_retries: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    samples_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    step_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Wall time of the last (steady) iteration (migration 0005; NULL on older trials)."""
    move: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Why the guided search ran this size (`tuner.search_types.Move`; migration 0005)."""
    peak_phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    probe: Mapped[ProbeRow] = relationship(back_populates="trials")

    __table_args__ = (UniqueConstraint("probe_id", "index"),)


class PlanRow(Base):
    """A plan as served: the request, every `tuner.results.Plan` field, and columns to filter on."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The plan's identity: `storage.identity.plan_request_hash(request, probe_ids)`. Unique, so
    that replicas deriving the same plan at once store it once. NULL only on a plan that migration
    0002 found to repeat an older plan's identity (the older one keeps it)."""
    cache_hit: Mapped[bool] = mapped_column(Boolean)
    fingerprint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    """The workload's short name (`WorkloadSpec.describe()`): gpt2, resnet50, builtin decoder."""
    family: Mapped[str] = mapped_column(String(32))
    workload: Mapped[dict[str, Any]] = mapped_column(JSON)
    device_name: Mapped[str] = mapped_column(String(200))
    device_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    backend: Mapped[str] = mapped_column(String(16))
    effective_batch_size: Mapped[int] = mapped_column(Integer)
    world_size: Mapped[int] = mapped_column(Integer)
    micro_batch_size: Mapped[int] = mapped_column(Integer)
    accumulation_steps: Mapped[int] = mapped_column(Integer)
    micro_batch_sizes: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    gradient_checkpointing: Mapped[bool] = mapped_column(Boolean)
    max_micro_batch_size: Mapped[dict[str, int]] = mapped_column(JSON)
    memory_budget_bytes: Mapped[int] = mapped_column(BigInteger)
    predicted_peak_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    predicted_samples_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    probe_id: Mapped[int | None] = mapped_column(
        ForeignKey("probe_results.id", ondelete="SET NULL"), nullable=True
    )
    probe_ids: Mapped[dict[str, int]] = mapped_column(JSON)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    warnings: Mapped[list[str]] = mapped_column(JSON)
    hints: Mapped[list[str]] = mapped_column(JSON)
    accumulation_schedule: Mapped[list[dict[str, int]] | None] = mapped_column(JSON, nullable=True)
    versions: Mapped[dict[str, str]] = mapped_column(JSON)
    eval_and_tokens: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """The eval micro-batch and the token budget, where the request asked for them (migration
    0006): `tuner.results.Plan`'s `eval_*`, `max_tokens_per_micro_batch` and `token_budget`."""
    memory_per_rank: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    """One rank's traced bytes per category at the chosen probe's answer (estimate backend)."""

    __table_args__ = (
        Index("ix_plans_created_at", "created_at"),
        Index("ix_plans_fingerprint", "fingerprint"),
        Index("ix_plans_device_name", "device_name"),
        Index("ix_plans_model", "model"),
        Index("uq_plans_request_hash", "request_hash", unique=True),
    )


class JobRow(Base):
    """A probe to run: queued until a worker whose device matches claims it with a lease."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(512))
    """One active job per key: the probes it produces (`storage.planning.job_key`)."""
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    """What to probe, as the worker reads it."""
    backend: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """None: any device of the backend will do."""
    device_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=JOB_QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Claims so far (a released job gives its attempt back)."""
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    """Not claimed before this time (retry backoff)."""
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The code of a failure the request caused (NULL: the service's failure); migration 0005."""
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    probe_id: Mapped[int | None] = mapped_column(
        ForeignKey("probe_results.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        CheckConstraint(sql_in(JOB_STATUSES), name="status"),
        # One active job per key: concurrent enqueue-or-join calls for one probe meet here.
        Index(
            "uq_jobs_active_key",
            "key",
            unique=True,
            postgresql_where=text(sql_in(ACTIVE_JOB_STATUSES)),
            sqlite_where=text(sql_in(ACTIVE_JOB_STATUSES)),
        ),
        # What a claim scans (queued, due) and what the requeue of stalled jobs scans.
        Index("ix_jobs_status_run_after", "status", "run_after"),
        Index("ix_jobs_status_lease_until", "status", "lease_until"),
    )


class JobWaiterRow(Base):
    """A plan request waiting on a job: the plan to derive once the job's probe is stored."""

    __tablename__ = "job_waiters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=WAITER_PENDING)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id", ondelete="SET NULL"), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        CheckConstraint(sql_in(WAITER_STATUSES), name="status"),
        Index("ix_job_waiters_job_id_status", "job_id", "status"),
    )


class WorkerRow(Base):
    """A worker that is up: what it serves, and until when it counts as alive.

    Each worker renews its row while it runs (idle or busy) and deletes it when it stops; a row
    whose `expires_at` has passed is a worker that died. The API reads these rows to tell a request
    that no live worker could run it, instead of queueing it silently."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    backend: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    """The worker's GPU (cuda); None: jobs for any device (estimate)."""
    device_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    """Alive until then, unless renewed."""

    __table_args__ = (Index("ix_workers_backend_expires_at", "backend", "expires_at"),)
