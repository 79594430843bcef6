"""The FastAPI app: `create_app()` wires settings, database, cache, metrics, routers and errors.

Run it with `uvicorn --factory api.app:create_app` or `uvicorn api.app:app` (the module attribute
`app` is created on first access, from the environment's settings). The database comes from
`TUNER_DATABASE_URL`; the schema is migrated to the newest revision at start (safe when several
replicas start at once: migrations hold a lock). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from sqlalchemy import Engine

from api import storage_adapter
from api.body_limit import BodyLimitMiddleware
from api.cache import ResponseCache
from api.deps import ApiContext
from api.errors import install_error_handlers
from api.fast_path import CachedPlanMiddleware
from api.metrics import ApiMetrics, DatabaseFigures, MetricsMiddleware
from api.plan_service import PlanService, installed_torch_minor
from api.routers import health, jobs, metrics, plans, probes, ui
from storage import repository
from storage.db import count_statements, ensure_schema, make_engine, session_factory
from tuner.job_status import ACTIVE_JOB_STATUSES
from tuner.settings import Settings, get_settings
from tuner.spec import PlanRequest

API_VERSION = "1"
DOCS_STATIC_URL = "/docs/static"
"""Where the interactive docs' own scripts, styles and icon are served."""


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """A new app with its own engine (unless given), cache and metrics registry."""
    settings = settings or get_settings()
    engine = engine or make_engine(settings.database_url)
    ensure_schema(engine)
    sessions = session_factory(engine)
    cache = ResponseCache()
    api_metrics = ApiMetrics()
    count_statements(engine, api_metrics.db_statements.inc)
    api_metrics.add_database_figures(
        DatabaseFigures(
            queue_depth=lambda: _active_job_counts(sessions),
            probe_totals=lambda: _with_session(sessions, storage_adapter.probe_totals),
        )
    )
    torch_minor = settings.torch_minor or installed_torch_minor()
    token = settings.api_token.get_secret_value().encode() if settings.api_token else None

    plans_service = PlanService(
        engine,
        sessions,
        cache=cache,
        metrics=api_metrics,
        torch_minor=torch_minor,
        max_attempts=settings.max_attempts,
        job_poll_seconds=settings.job_poll_seconds,
        allowed_factory_packages=settings.allowed_factory_package_set,
    )
    api_metrics.add_wait_figures(
        waiting_requests=lambda: plans_service.watcher.waiting_requests,
        watched_jobs=lambda: plans_service.watcher.watched_jobs,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await plans_service.close()

    # `/docs` (Swagger UI) and `/redoc` load their scripts and styles from this package, not a CDN.
    app = FastAPIOffline(
        lifespan=lifespan,
        title="tuner",
        version=API_VERSION,
        summary="Memory-budget plans for PyTorch training: micro-batch, accumulation, checkpointing.",
        static_url=DOCS_STATIC_URL,
    )
    app.state.context = ApiContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        cache=cache,
        metrics=api_metrics,
        plans=plans_service,
        torch_minor=torch_minor,
        api_token=token,
    )
    install_error_handlers(app)
    for router in (plans.router, jobs.router, probes.router, health.router, metrics.router, ui.router):
        app.include_router(router)
    # Added innermost first: metrics time everything, including refusals of oversized bodies
    # and the cached plans answered before routing.
    app.add_middleware(CachedPlanMiddleware, context=app.state.context)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=api_metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the plan request schema: `POST /v1/plans` reads its body raw (for
    the cached fast path), so FastAPI does not know the body's model by itself."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    request_schema = PlanRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in request_schema.pop("$defs", {}).items():
        # Same-named models FastAPI already documented are the same pydantic classes.
        schemas.setdefault(name, definition)
    schemas["PlanRequest"] = request_schema
    app.openapi_schema = document
    return document


def _with_session(sessions: Any, read: Any) -> Any:
    with sessions() as session:
        return read(session)


def _active_job_counts(sessions: Any) -> dict[str, int]:
    counts = _with_session(sessions, repository.job_counts)
    return {status: counts.get(status, 0) for status in ACTIVE_JOB_STATUSES}


def __getattr__(name: str) -> Any:
    # `uvicorn api.app:app`: the app is built on first access, so that importing this module
    # (tests, `--factory`) neither reads the environment nor opens a database.
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
