"""What routes depend on: the app's context, a database session, write access.

`Annotated` aliases (`ContextDep`, `SessionDep`) keep the routes' signatures short; `WriteAccess`
goes into the `dependencies` of every write route. The context and token checks are `async` so
that FastAPI runs them on the event loop, not in its thread pool: the cached plan path uses them.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.cache import ResponseCache
from api.metrics import ApiMetrics
from api.plan_service import PlanService
from tuner.errors import AuthError
from tuner.settings import Settings


@dataclass(frozen=True)
class ApiContext:
    """Everything one app shares between requests."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    cache: ResponseCache
    metrics: ApiMetrics
    plans: PlanService
    torch_minor: str
    """The torch minor version plans are looked up for."""
    api_token: bytes | None
    """The write token, encoded once (None: writes are open)."""


async def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


ContextDep = Annotated[ApiContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

# Declares the scheme in the OpenAPI document; the check itself reads the header (below) so that
# a missing token and a wrong one get different messages.
_bearer = HTTPBearer(auto_error=False, description="`TUNER_API_TOKEN`, required on writes when set.")


async def require_write_token(
    request: Request,
    context: ContextDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Writes need `Authorization: Bearer <TUNER_API_TOKEN>` when the server has a token."""
    check_write_token(context, request.headers.get("authorization"))


def check_write_token(context: ApiContext, header: str | None) -> None:
    """The token check itself, callable without FastAPI's dependency machinery (the cached plan
    path calls it directly)."""
    expected = context.api_token
    if expected is None:
        return
    if not header:
        raise AuthError(
            "This server requires a bearer token for writes: send 'Authorization: Bearer <token>' "
            "with the value of TUNER_API_TOKEN."
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("The Authorization header must be 'Bearer <token>'.")
    if not hmac.compare_digest(token.strip().encode(), expected):
        raise AuthError("The bearer token is not valid for this server.")


BEARER_SCHEME = "HTTPBearer"
"""The security scheme's name in the OpenAPI document (FastAPI names it after the class)."""


WriteAccess = Depends(require_write_token)
