"""`/v1/probes`: read a probe result with every trial; store one measured elsewhere.

An upload is keyed like the cache (fingerprint, device, backend, torch minor, checkpointing).
Uploading what is already stored for that key (same largest batch, same trials) is idempotent:
200 with the stored result. A different answer for a key that already has one is 409 `conflict`:
the fleet's cache stays what plans were derived from; the same holds for an `id` in the body
that names a stored result with other content. A new result is 201 with its `Location`.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import ContextDep, SessionDep, WriteAccess
from api.probe_service import store_uploaded_probe
from api.schemas import ErrorOut, ProbeResult, RowId
from storage import repository

router = APIRouter(prefix="/v1/probes", tags=["probes"])


@router.get(
    "/{probe_id}",
    response_model=ProbeResult,
    responses={404: {"model": ErrorOut}},
    summary="One probe result",
)
def get_probe(probe_id: RowId, session: SessionDep) -> ProbeResult:
    probe: ProbeResult = repository.get_probe(session, probe_id=probe_id)
    return probe


@router.post(
    "",
    dependencies=[WriteAccess],
    response_model=ProbeResult,
    status_code=201,
    responses={
        200: {"model": ProbeResult, "description": "The same result was stored already."},
        **{status: {"model": ErrorOut} for status in (401, 409, 413, 422)},
    },
    summary="Store a probe result measured elsewhere",
)
def upload_probe(
    result: ProbeResult, session: SessionDep, context: ContextDep, response: Response
) -> ProbeResult:
    stored, created = store_uploaded_probe(
        session, result=result, allowed_factory_packages=context.settings.allowed_factory_package_set
    )
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/v1/probes/{stored.id}"
    return stored
