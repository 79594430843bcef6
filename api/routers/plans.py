"""`/v1/plans`: ask for a plan, list past plans, read one."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import BEARER_SCHEME, ApiContext, SessionDep, check_write_token
from api.errors import InvalidRequestError
from api.plan_service import MAX_WAIT_SECONDS
from api.schemas import ErrorOut, JobOut, Plan, PlanList, RowId
from api.worker_availability import FLAG_VALUES, QUEUE_WITHOUT_WORKER
from storage import repository

router = APIRouter(prefix="/v1/plans", tags=["plans"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (401, 409, 413, 422, 503)
}


@router.post(
    "",
    response_model=None,
    status_code=200,
    summary="Get a plan: from the cache, or after a shared probe",
    responses={
        200: {"model": Plan, "description": "The plan (cached, or finished within `wait`)."},
        202: {
            "model": JobOut,
            "description": "The probe job the plan waits for; poll its `Location`.",
            "headers": {"Location": {"description": "`/v1/jobs/{id}`", "schema": {"type": "string"}}},
        },
        **_ERRORS,
    },
    # The endpoint takes no FastAPI parameters (they cost more than the whole cached answer), so
    # its body, query parameter and security are declared here for the OpenAPI document.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PlanRequest"}}},
        },
        "parameters": [
            {
                "name": "wait",
                "in": "query",
                "required": False,
                "description": "Seconds to wait for a probe job (0 to 300).",
                "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS, "default": 0},
            },
            {
                "name": QUEUE_WITHOUT_WORKER,
                "in": "query",
                "required": False,
                "description": "Queue the probe job even when no live worker can run it yet (a fleet "
                "whose workers start later); without it such a request is refused with 409 `no_worker`.",
                "schema": {"type": "boolean", "default": False},
            },
        ],
        "security": [{BEARER_SCHEME: []}],
    },
)
async def create_plan(request: Request) -> Response:
    """The body is a plan request (CONTRACT.md). It is read raw, not by FastAPI: an identical
    earlier body is answered from memory without being parsed again."""
    context: ApiContext = request.app.state.context
    check_write_token(context, request.headers.get("authorization"))
    wait = parse_wait(request.query_params.get("wait"))
    queue_without_worker = parse_flag(QUEUE_WITHOUT_WORKER, request.query_params.get(QUEUE_WITHOUT_WORKER))
    raw_body = await request.body()
    cached = context.plans.cached_answer(raw_body)
    if cached is not None:
        return Response(cached, media_type="application/json")
    answer = await context.plans.create(raw_body, wait=wait, queue_without_worker=queue_without_worker)
    return Response(
        answer.body, status_code=answer.status, media_type="application/json", headers=answer.headers
    )


def parse_flag(name: str, value: str | None) -> bool:
    """A boolean query parameter: `true`/`1` or `false`/`0` (absent: false)."""
    if value is None:
        return False
    flag = FLAG_VALUES.get(value.strip().lower())
    if flag is None:
        raise InvalidRequestError(f"Invalid request: query.{name} must be true or false, got {value!r}.")
    return flag


def parse_wait(value: str | None) -> float:
    """`?wait=S`: seconds, 0 to 300."""
    if value is None:
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise InvalidRequestError(
            f"Invalid request: query.wait must be a number of seconds from 0 to 300, got {value!r}."
        )
    return wait


@router.get("", response_model=PlanList, summary="Past plans, newest first")
def list_plans(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=(1 << 31) - 1)] = 0,
    fingerprint: Annotated[str | None, Query(max_length=64)] = None,
    device_name: Annotated[str | None, Query(max_length=200)] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    backend: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    items, total = repository.list_plans(
        session,
        limit=limit,
        offset=offset,
        fingerprint=fingerprint,
        device_name=device_name,
        model=model,
        backend=backend,
    )
    # Serialized here, once: returning the model would make FastAPI validate every plan again.
    return Response(PlanList(items=items, total=total).model_dump_json(), media_type="application/json")


@router.get("/{plan_id}", response_model=Plan, responses={404: {"model": ErrorOut}}, summary="One plan")
def get_plan(plan_id: RowId, session: SessionDep) -> Plan:
    plan: Plan = repository.get_plan(session, plan_id=plan_id)
    return plan
