"""`/ui/…`: server-rendered pages for people: past plans, one plan with its charts, probe jobs.

The routes only: they read the request, ask `api.pages` for the page's view models and render its
template (`api.pages.rendering`: autoescaped, sent with a Content-Security-Policy that forbids
scripts). Charts are inline SVG from `api.charts`; the one stylesheet is served from
`api/static/`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from api.deps import SessionDep
from api.pages.jobs import jobs_context
from api.pages.plans import DEFAULT_PAGE_SIZE, plan_list_context, plan_page_context
from api.pages.rendering import STATIC_DIR, STYLESHEET, not_found_page, render_page
from tuner.errors import NotFoundError

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)

MAX_ROW_ID = (1 << 31) - 1
"""Ids are 32-bit in the database; a larger one in a URL is simply not there."""


@router.get("", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/plans", status_code=307)


@router.get(f"/static/{STYLESHEET}")
def stylesheet() -> FileResponse:
    return FileResponse(
        STATIC_DIR / STYLESHEET,
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/plans", response_class=HTMLResponse)
def plans_page(
    request: Request,
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=200)] = None,
    device: Annotated[str | None, Query(max_length=200)] = None,
    backend: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = DEFAULT_PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_ROW_ID)] = 0,
) -> HTMLResponse:
    context = plan_list_context(
        session, model=model, device=device, backend=backend, limit=limit, offset=offset
    )
    return render_page(request, "plans.html", context)


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(request: Request, session: SessionDep, plan_id: str) -> HTMLResponse:
    # A path that is not an id is a page that does not exist, not a validation error.
    if not plan_id.isdigit() or not 1 <= int(plan_id) <= MAX_ROW_ID:
        return not_found_page(request, f"There is no plan with id {plan_id!r}.")
    try:
        context = plan_page_context(session, int(plan_id))
    except NotFoundError:
        return not_found_page(request, f"There is no plan with id {plan_id}.")
    return render_page(request, "plan.html", context)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep) -> HTMLResponse:
    return render_page(request, "jobs.html", jobs_context(session))


@router.get("/{path:path}", response_class=HTMLResponse)
def unknown_page(request: Request, path: str) -> HTMLResponse:
    return not_found_page(request, f"There is no page /ui/{path}.")
