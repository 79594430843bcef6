"""Every error the API answers has one shape: `{"detail": "<one sentence>", "code": "<machine code>"}`.

One table maps the domain's `TunerError` codes to HTTP statuses; FastAPI's own validation errors,
404s and 405s are rewritten into the same shape, and anything unexpected becomes a 500 whose body
says nothing about the server's internals. Database outages are 503: the client's request may be
fine, the service is not.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuner.errors import TunerError

log = logging.getLogger(__name__)


class MalformedJSONError(TunerError):
    """A request body that is not JSON at all (as opposed to JSON that does not validate)."""

    code = "invalid_json"


class InvalidRequestError(TunerError):
    """A query or path parameter out of range (checked outside FastAPI's own validation)."""

    code = "invalid_request"


class BodyTooLargeError(TunerError):
    """A request body larger than the `max_body_bytes` setting."""

    code = "body_too_large"


class DatabaseUnavailableError(TunerError):
    """The database could not be reached or answered with an operational error."""

    code = "database_unavailable"


class NoWorkerError(TunerError):
    """No live worker could run the probe a plan request needs (and the request did not ask to be
    queued anyway with `queue_without_worker=true`)."""

    code = "no_worker"


class JobFailedError(TunerError):
    """The probe job a plan request waited on failed for a reason that is not the client's."""

    code = "probe_failed"


# Client mistakes are 4xx; failures of the service (a probe that crashed) are 5xx.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_spec": 422,
    "invalid_json": 422,
    "invalid_request": 422,
    "model_build_failed": 422,
    "estimate_failed": 422,
    "nothing_fits": 422,
    "plan_impossible": 422,
    "device_required": 422,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "no_worker": 409,
    "unauthorized": 401,
    "body_too_large": 413,
    "probe_failed": 503,
    "service_error": 503,
    "database_unavailable": 503,
}


def error_body(detail: str, code: str) -> dict[str, str]:
    return {"detail": detail, "code": code}


def error_response(
    status: int, detail: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(detail, code), status_code=status, headers=headers)


def status_for(error: TunerError) -> int:
    return STATUS_BY_CODE.get(error.code, 500)


async def _tuner_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TunerError)
    status = status_for(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, exc.message, exc.code, headers)


def describe_validation_errors(errors: Any) -> str:
    """FastAPI's error list as one sentence naming each field: `query.limit: ...; body: ...`."""
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {message}" if loc else message)
    return "Invalid request: " + "; ".join(parts) + "."


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, describe_validation_errors(exc.errors()), "invalid_request")


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail = f"No resource at {request.url.path}."
    elif exc.status_code == 405:
        detail = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        detail = str(exc.detail).rstrip(".") + "."
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, detail, code, dict(exc.headers) if exc.headers else None)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database error on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "The database is unavailable; try again shortly.", "database_unavailable")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "The server failed unexpectedly; the error is logged.", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the contract's shape."""
    app.add_exception_handler(TunerError, _tuner_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
