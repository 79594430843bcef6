"""`/v1/jobs/{id}`: a probe job's status, progress and, once succeeded, its plan."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep
from api.plan_service import job_view
from api.schemas import ErrorOut, JobOut, RowId
from storage import repository

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}}, summary="One probe job")
def get_job(job_id: RowId, session: SessionDep) -> JobOut:
    return job_view(session, repository.get_job(session, job_id=job_id))
