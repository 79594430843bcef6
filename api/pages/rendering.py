"""Rendering a page: the Jinja2 templates (autoescaped, every user-supplied string escaped) with
the `formats` filters, and the headers every page is sent with. The pages run no script: the
Content-Security-Policy forbids scripts and anything fetched from elsewhere, so that even a missed
escape could not run code in a reader's browser."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from api.pages.formats import format_count, format_move, format_time
from tuner.units import format_bytes

API_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = API_DIR / "templates"
STATIC_DIR = API_DIR / "static"
STYLESHEET = "tuner.css"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["bytes"] = format_bytes
    env.filters["when"] = format_time
    env.filters["count"] = format_count
    env.filters["move"] = format_move
    return env


templates = Jinja2Templates(env=_environment())


def render_page(
    request: Request, template: str, context: Mapping[str, Any], status_code: int = 200
) -> HTMLResponse:
    """`template` rendered with `context` and the stylesheet's address, sent with the security
    headers."""
    response = templates.TemplateResponse(
        request, template, {"stylesheet": f"/ui/static/{STYLESHEET}", **context}, status_code=status_code
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


def not_found_page(request: Request, message: str) -> HTMLResponse:
    return render_page(request, "not_found.html", {"message": message}, status_code=404)
