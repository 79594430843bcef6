"""`/healthz`: the process is up and its database answers."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import ContextDep
from api.schemas import ErrorOut, HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, responses={503: {"model": ErrorOut}}, summary="Liveness")
def healthz(context: ContextDep) -> HealthOut:
    # An unreachable database raises OperationalError, which the error handlers answer with 503.
    with context.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return HealthOut(status="ok", database="ok")
