"""`/v1/plans`: ask for a plan, list past plans, read one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.deps import BEARER_SCHEME, ApiContext, SessionDep, check_write_token
from api.plan_query import WAIT, parse_plan_query
from api.plan_service import MAX_WAIT_SECONDS
from api.schemas import ErrorOut, JobOut, Plan, PlanList, RowId
from api.worker_availability import QUEUE_WITHOUT_WORKER
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
                "name": WAIT,
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
    """The body is a plan request (docs/contract.md). It is read raw, not by FastAPI: an identical
    earlier body is answered from memory, in front of the router, without being parsed again."""
    context: ApiContext = request.app.state.context
    check_write_token(context, request.headers.get("authorization"))
    query = parse_plan_query(request.query_params)
    # A body whose answer is cached never gets here: `api.fast_path` sent it already.
    answer = await context.plans.create(
        await request.body(), wait=query.wait, queue_without_worker=query.queue_without_worker
    )
    return Response(
        answer.body, status_code=answer.status, media_type="application/json", headers=answer.headers
    )


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
