"""`/ui/plans`: a plain HTML table of past plans for people (a minimal page)."""

from __future__ import annotations

from html import escape
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from api.deps import SessionDep
from storage import repository
from tuner.units import format_bytes

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)

_COLUMNS = (
    "id",
    "created",
    "model",
    "device",
    "backend",
    "effective batch",
    "micro-batch",
    "accumulation",
    "checkpointing",
    "predicted peak",
)


@router.get("/plans", response_class=HTMLResponse)
def plans_page(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=(1 << 31) - 1)] = 0,
) -> HTMLResponse:
    plans, total = repository.list_plans(session, limit=limit, offset=offset)
    head = "".join(f"<th>{escape(name)}</th>" for name in _COLUMNS)
    rows = []
    for plan in plans:
        peak = format_bytes(plan.predicted_peak_bytes) if plan.predicted_peak_bytes is not None else "—"
        cells = (
            str(plan.id),
            plan.created_at.strftime("%Y-%m-%d %H:%M") if plan.created_at else "",
            plan.workload.describe(),
            f"{plan.device.name} ({format_bytes(plan.device.total_memory_bytes)})",
            plan.backend,
            str(plan.effective_batch_size),
            str(plan.micro_batch_size),
            str(plan.accumulation_steps),
            "on" if plan.gradient_checkpointing else "off",
            peak,
        )
        rows.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>")
    body = "\n".join(rows) or f'<tr><td colspan="{len(_COLUMNS)}">No plans yet.</td></tr>'
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>tuner: plans</title></head><body>'
        f'<h1>Plans</h1><p>{total} plan(s).</p><table border="1"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></body></html>"
    )
    return HTMLResponse(page)
