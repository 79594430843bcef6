"""The cached answer of `POST /v1/plans`, served before FastAPI's routing and dependencies.

A repeated plan request is the hot path of the service (every training run asks at start-up), and
its answer is immutable: the serialized plan kept under the hash of the raw body (`api.cache`).
This pure ASGI layer reads the body, and when the cache has it and the request is authorized (the
bearer token is checked exactly as on every write) and its query parameters are valid, sends the
stored bytes. Everything else — a miss, a bad token, a query `api.plan_query` refuses —
goes on to the app with the body replayed, where the router answers it (the 401 and 422
included) in the usual way.
"""

from __future__ import annotations

import json

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import ApiContext, check_write_token
from api.errors import BodyTooLargeError, InvalidRequestError, error_body
from api.plan_query import parse_plan_query
from tuner.errors import AuthError

PLANS_PATH = "/v1/plans"
ROUTE_KEY = "tuner.route"
"""Scope key naming the route for the metrics when the router never saw the request."""
_JSON_HEADERS = [(b"content-type", b"application/json")]


class CachedPlanMiddleware:
    def __init__(self, app: ASGIApp, context: ApiContext) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PLANS_PATH:
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
        except BodyTooLargeError as exc:
            await _send(send, 413, json.dumps(error_body(exc.message, exc.code)).encode())
            return
        cached = self.context.plans.cached_answer(body) if _authorized(self.context, scope) else None
        if cached is not None and _valid_query(scope):
            scope[ROUTE_KEY] = PLANS_PATH
            await _send(send, 200, cached)
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the disconnect, when it comes

    return replay


def _authorized(context: ApiContext, scope: Scope) -> bool:
    if context.api_token is None:
        return True
    header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
    try:
        check_write_token(context, header.decode("latin-1") if header is not None else None)
    except AuthError:
        return False
    return True


def _valid_query(scope: Scope) -> bool:
    """Whether the router would accept the query parameters (it answers them otherwise)."""
    try:
        parse_plan_query(QueryParams(scope.get("query_string", b"")))
    except InvalidRequestError:
        return False
    return True


async def _send(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
