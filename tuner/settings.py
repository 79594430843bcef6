"""Process settings: one pydantic-settings class, `TUNER_` environment prefix, fail fast."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PROBE_TIMEOUT_SECONDS = 900.0
"""Wall-clock limit of one probe's child process, unless the caller passes its own (the CLI and
the worker pass `probe_timeout_seconds`)."""
DEFAULT_ESTIMATE_TIMEOUT_SECONDS = 300.0
"""Wall-clock limit of one estimate trace's child process, unless the caller passes its own."""


class Settings(BaseSettings):
    """Everything a tuner process reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="TUNER_", extra="ignore")

    database_url: str = "sqlite:///./tuner.db"
    """SQLAlchemy URL: an SQLite file (the embedded default) or PostgreSQL for a fleet."""

    api_token: SecretStr | None = None
    """When set, every write to the API needs `Authorization: Bearer <token>`."""

    allowed_factory_packages: str = ""
    """Comma-separated top-level packages whose `python` factories a spec may name."""

    server: str | None = None
    """Base URL of a tuner service for `plan_for` and the CLI; none means plan locally."""

    worker_backend: Literal["auto", "cuda", "estimate"] = "auto"
    """Backend of the local worker: `auto` is cuda when a GPU is present, else estimate."""

    lease_seconds: float = Field(default=60.0, gt=0)
    """How long a claimed job stays the worker's without a heartbeat."""

    heartbeat_seconds: float = Field(default=10.0, gt=0)
    """How often a worker renews its lease while probing."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts before a job ends `failed`."""

    retry_backoff_seconds: float = Field(default=10.0, ge=0)
    """Delay before a failed job's first retry; it doubles with every further attempt."""

    worker_poll_seconds: float = Field(default=1.0, gt=0)
    """How long an idle worker waits between looks at the queue."""

    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long a worker lets its current job finish before releasing it."""

    probe_timeout_seconds: float = Field(default=DEFAULT_PROBE_TIMEOUT_SECONDS, gt=0)
    """Wall-clock limit of one probe's child process."""

    estimate_timeout_seconds: float = Field(default=DEFAULT_ESTIMATE_TIMEOUT_SECONDS, gt=0)
    """Wall-clock limit of one estimate trace's child process."""

    job_poll_seconds: float | None = Field(default=None, gt=0)
    """How often an API process looks at the jobs its requests wait on, besides being told that
    they ended: default 0.5 s on SQLite (workers in other processes cannot notify it), 5 s on
    PostgreSQL (where workers notify, and the poll only covers a lost notification)."""

    max_body_bytes: int = Field(default=1_000_000, gt=0)
    """Largest request body the API accepts."""

    torch_minor: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    """The torch minor version (`2.13`) plans are looked up for; default: the installed torch's."""

    @field_validator("allowed_factory_packages")
    @classmethod
    def _strip(cls, value: str) -> str:
        return ",".join(part.strip() for part in value.split(",") if part.strip())

    @property
    def allowed_factory_package_set(self) -> frozenset[str]:
        return frozenset(p for p in self.allowed_factory_packages.split(",") if p)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; tests that change the environment call `get_settings.cache_clear()`."""
    return Settings()
