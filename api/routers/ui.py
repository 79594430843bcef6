"""`/ui/…`: server-rendered pages for people: past plans, one plan with its charts, probe jobs.

Jinja2 templates with autoescaping (every user-supplied string is escaped), charts as inline SVG
from `api.charts`, one stylesheet served from `api/static/`. The pages run no script: each
response carries a Content-Security-Policy that forbids scripts and anything fetched from
elsewhere, so that even a missed escape could not run code in a reader's browser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from sqlalchemy.orm import Session

from api.charts import ChartSeries, memory_chart, throughput_chart
from api.deps import SessionDep
from api.worker_availability import job_worker_available
from storage import repository
from storage.records import JobRecord
from tuner.errors import NotFoundError
from tuner.planner import divisors_up_to
from tuner.results import Plan, ProbeResult
from tuner.search_types import MOVE_REASONS
from tuner.units import format_bytes

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)

API_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = API_DIR / "templates"
STATIC_DIR = API_DIR / "static"
STYLESHEET = "tuner.css"

BACKENDS = ("cuda", "estimate")
DEFAULT_PAGE_SIZE = 25
MAX_ROW_ID = (1 << 31) - 1
"""Ids are 32-bit in the database; a larger one in a URL is simply not there."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# ---------------------------------------------------------------------------------------- formats


def format_time(moment: datetime | None) -> str:
    """`2025-01-31 14:05 UTC`; stored times are UTC (naive ones from SQLite included)."""
    if moment is None:
        return "—"
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def format_count(count: int | None) -> str:
    """Parameter counts for people: `124.4M`, `1.10B`, `8,192`."""
    if count is None:
        return "—"
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M")):
        if count >= size:
            value = count / size
            return f"{value:.2f}{suffix}" if value < 10 else f"{value:.1f}{suffix}"
    return f"{count:,}"


def _comment_safe(text: str, limit: int = 120) -> str:
    """User text placed in a Python comment of a snippet: one line, printable, bounded (a
    newline in a model name must not turn into code when the snippet is pasted)."""
    flat = re.sub(r"[^\x20-\x7e\u00a0-\uffff]", " ", text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


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
    # Why the guided search ran a trial (`Trial.move`), in the words the CLI uses.
    env.filters["move"] = lambda move: MOVE_REASONS.get(move, move) if move else "—"
    return env


templates = Jinja2Templates(env=_environment())


def _page(
    request: Request, template: str, context: Mapping[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, template, {"stylesheet": f"/ui/static/{STYLESHEET}", **context}, status_code=status_code
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


# ------------------------------------------------------------------------------------- view models


@dataclass(frozen=True)
class PlanView:
    """One plan as the pages show it."""

    plan: Plan
    id: int
    model: str
    family: str
    parameter_count: int | None
    split: str
    """`micro × accumulation × world`, or the uneven micro-batches of one window."""
    peak_fraction: float | None
    """Predicted peak over the memory budget (None when no peak was predicted)."""

    @property
    def peak_percent(self) -> float:
        return 0.0 if self.peak_fraction is None else round(100.0 * self.peak_fraction, 1)

    @property
    def bar_width(self) -> float:
        return min(100.0, self.peak_percent)


def plan_view(plan: Plan, facts_probe: ProbeResult | None) -> PlanView:
    facts = facts_probe.facts if facts_probe is not None else None
    peak = plan.predicted_peak_bytes
    return PlanView(
        plan=plan,
        id=plan.id or 0,
        model=plan.workload.describe(),
        family=plan.workload.model.family,
        parameter_count=facts.parameter_count if facts is not None else None,
        split=describe_split(plan),
        peak_fraction=None
        if peak is None or plan.memory_budget_bytes <= 0
        else peak / plan.memory_budget_bytes,
    )


def describe_split(plan: Plan) -> str:
    """`32 × 16 × 1`; uneven windows as `(6 × 47 + 5 × 46) × 1`."""
    if plan.micro_batch_sizes:
        counts: dict[int, int] = {}
        for size in plan.micro_batch_sizes:
            counts[size] = counts.get(size, 0) + 1
        window = " + ".join(f"{n} × {size}" for size, n in sorted(counts.items(), reverse=True))
        return f"({window}) × {plan.world_size}"
    return f"{plan.micro_batch_size} × {plan.accumulation_steps} × {plan.world_size}"


def _probes(session: Session, probe_ids: Iterable[int]) -> dict[int, ProbeResult]:
    """The probes with these ids that are still stored (each read once)."""
    found: dict[int, ProbeResult] = {}
    for probe_id in dict.fromkeys(probe_ids):
        try:
            found[probe_id] = repository.get_probe(session, probe_id=probe_id)
        except NotFoundError:
            continue
    return found


def _plan_probe_ids(plan: Plan) -> list[tuple[str, int]]:
    """(checkpointing label, probe id), checkpointing off first."""
    pairs = sorted(plan.probe_ids.items(), key=lambda item: item[0] != "off")
    if not pairs and plan.probe_id is not None:
        pairs = [("on" if plan.gradient_checkpointing else "off", plan.probe_id)]
    return pairs


# ------------------------------------------------------------------------------------------ routes


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


def _filter(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


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
    filters = {"model": _filter(model), "device": _filter(device), "backend": _filter(backend)}
    plans, total = repository.list_plans(
        session,
        limit=limit,
        offset=offset,
        model=filters["model"],
        device_name=filters["device"],
        backend=filters["backend"],
    )
    probes = _probes(session, [p.probe_id for p in plans if p.probe_id is not None])
    rows = [plan_view(p, probes.get(p.probe_id) if p.probe_id is not None else None) for p in plans]
    kept = {name: value for name, value in filters.items() if value is not None}
    if limit != DEFAULT_PAGE_SIZE:
        kept["limit"] = str(limit)

    def page_link(page_offset: int) -> str:
        return "/ui/plans?" + urlencode({**kept, "offset": page_offset})

    return _page(
        request,
        "plans.html",
        {
            "rows": rows,
            "total": total,
            "filters": filters,
            "backends": BACKENDS,
            "first": offset + 1 if rows else 0,
            "last": offset + len(rows),
            "previous_url": page_link(max(0, offset - limit)) if offset > 0 else None,
            "next_url": page_link(offset + limit) if offset + limit < total else None,
            "model_choices": sorted({r.model for r in rows}),
            "device_choices": sorted({r.plan.device.name for r in rows}),
            "filtered": bool(kept.keys() - {"limit"}),
        },
    )


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(request: Request, session: SessionDep, plan_id: str) -> HTMLResponse:
    # A path that is not an id is a page that does not exist, not a validation error.
    if not plan_id.isdigit() or not 1 <= int(plan_id) <= MAX_ROW_ID:
        return _not_found(request, f"There is no plan with id {plan_id!r}.")
    try:
        plan = repository.get_plan(session, plan_id=int(plan_id))
        plan_request = repository.get_plan_request(session, plan_id=int(plan_id))
    except NotFoundError:
        return _not_found(request, f"There is no plan with id {plan_id}.")
    labelled = _plan_probe_ids(plan)
    if plan.eval_probe_id is not None:
        labelled.append(("eval", plan.eval_probe_id))
    probes = _probes(session, [probe_id for _, probe_id in labelled])
    series_probes = [(label, probes[pid]) for label, pid in labelled if pid in probes]
    facts_probe = next((probe for _, probe in series_probes if probe.facts is not None), None)
    view = plan_view(plan, facts_probe)
    series = [
        ChartSeries(label=_series_label(label), trials=probe.trials, memory_line=probe.memory_line)
        for label, probe in series_probes
    ]
    charts = _charts(plan, series)
    return _page(
        request,
        "plan.html",
        {
            "view": view,
            "plan": plan,
            "probes": series_probes,
            "missing_probes": [pid for _, pid in labelled if pid not in probes],
            "facts": facts_probe.facts if facts_probe is not None else None,
            "memory_chart": charts[0],
            "throughput_chart": charts[1],
            "request_json": json.dumps(plan_request, indent=2, ensure_ascii=False),
            "loop_snippet": loop_snippet(plan),
            "trainer_snippet": trainer_snippet(plan),
            "margin_percent": round(plan.policy.memory_margin * 100, 1),
        },
    )


def _series_label(label: str) -> str:
    """A chart series' name: `checkpointing off`, or the eval step's curve."""
    return "eval step (training state resident)" if label == "eval" else f"checkpointing {label}"


def _charts(plan: Plan, series: list[ChartSeries]) -> tuple[Markup | None, Markup | None]:
    if not series:
        return None, None
    choice = "on" if plan.gradient_checkpointing else "off"
    model = plan.workload.describe()
    memory = memory_chart(
        series,
        capacity_bytes=plan.device.total_memory_bytes,
        budget_bytes=plan.memory_budget_bytes,
        chosen_batch_size=plan.micro_batch_size,
        chosen_peak_bytes=plan.predicted_peak_bytes,
        title=f"Peak memory of {model} on {plan.device.name} against micro-batch size "
        f"(chosen: {plan.micro_batch_size}, checkpointing {choice})",
    )
    throughput = throughput_chart(
        # Samples per second of the train step only: the eval step's would not compare.
        [one for one in series if not one.label.startswith("eval")],
        chosen_batch_size=plan.micro_batch_size,
        chosen_samples_per_second=plan.predicted_samples_per_second,
        title=f"Samples per second of {model} on {plan.device.name} against micro-batch size",
    )
    # The chart functions escape every text they write: their output is markup.
    return Markup(memory), None if throughput is None else Markup(throughput)


@dataclass(frozen=True)
class JobView:
    job: JobRecord
    model: str
    checkpointing: str
    progress: str


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep) -> HTMLResponse:
    jobs = repository.list_jobs(session, status=["running", "queued"], limit=200)
    # Running first (they move), then queued, each newest first.
    jobs.sort(key=lambda job: job.status != "running")
    counts = repository.job_counts(session)
    views = [
        JobView(
            job=job,
            model=describe_workload_data(job.payload.get("workload")),
            checkpointing=_checkpointing_choices(job.payload.get("gradient_checkpointing")),
            progress=describe_progress(job, job_worker_available(session, job)),
        )
        for job in jobs
    ]
    return _page(request, "jobs.html", {"jobs": views, "counts": counts})


@router.get("/{path:path}", response_class=HTMLResponse)
def unknown_page(request: Request, path: str) -> HTMLResponse:
    return _not_found(request, f"There is no page /ui/{path}.")


def _not_found(request: Request, message: str) -> HTMLResponse:
    return _page(request, "not_found.html", {"message": message}, status_code=404)


# -------------------------------------------------------------------------------------------- jobs


def describe_workload_data(data: Any) -> str:
    """A job payload's workload, named as `WorkloadSpec.describe` names it, from the raw dict
    (a payload is not re-validated to be shown)."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return "unknown model"
    family = model.get("family")
    config = model.get("config")
    if family == "transformers" and isinstance(config, dict):
        return str(config.get("model_type", "transformers model"))
    if family == "python":
        return str(model.get("factory", "python factory"))
    return str(model.get("name", family or "unknown model"))


def _checkpointing_choices(choices: Any) -> str:
    if not isinstance(choices, list) or not choices:
        return "—"
    return ", ".join("on" if choice else "off" for choice in choices)


def describe_progress(job: JobRecord, worker_available: bool | None = None) -> str:
    """What the worker last reported, in words (for a queued job: whether a live worker could
    claim it, `api.worker_availability`)."""
    if job.status == "queued":
        waiting = (
            f"no live {job.backend} worker can run it yet"
            if worker_available is False
            else "waiting for a worker"
        )
        return f"{waiting} (retry {job.attempts + 1} of {job.max_attempts})" if job.attempts else waiting
    progress = job.progress or {}
    trials = progress.get("trials")
    if not isinstance(trials, int) or trials == 0:
        return "starting"
    checkpointing = "on" if progress.get("gradient_checkpointing") else "off"
    text = f"{trials} trial{'s' if trials != 1 else ''} (checkpointing {checkpointing})"
    last = progress.get("last_batch_size")
    if isinstance(last, int):
        outcome = "fit" if progress.get("ok") else "did not fit"
        text += f"; last: micro-batch {last} {outcome}"
    return text


# ---------------------------------------------------------------------------------------- snippets


def _autocast(precision: str) -> str | None:
    return {"bf16-mixed": "torch.bfloat16", "fp16-mixed": "torch.float16"}.get(precision)


def loop_snippet(plan: Plan) -> str:
    """A plain training loop that applies the plan with `tuner.training.GradientAccumulator`."""
    precision = plan.workload.precision
    per_rank = plan.effective_batch_size // plan.world_size
    sizes = plan.micro_batch_sizes or [plan.micro_batch_size] * plan.accumulation_steps
    lines = [
        f"# Plan {plan.id}: {_comment_safe(plan.workload.describe())} on {_comment_safe(plan.device.name)}",
        f"# effective batch {plan.effective_batch_size} = {describe_split(plan)}"
        " (micro × accumulation × world)",
        "import torch",
        "from tuner.training import GradientAccumulator",
        "",
    ]
    if plan.micro_batch_sizes:
        lines.append(f"MICRO_BATCH_SIZES = {sizes}  # one optimizer step per rank: {per_rank} samples")
    else:
        lines += [
            f"MICRO_BATCH_SIZE = {plan.micro_batch_size}",
            f"ACCUMULATION_STEPS = {plan.accumulation_steps}",
            "MICRO_BATCH_SIZES = [MICRO_BATCH_SIZE] * ACCUMULATION_STEPS",
        ]
    lines.append("")
    if plan.gradient_checkpointing:
        if plan.workload.model.family == "transformers":
            lines.append(
                'model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})'
            )
        else:
            lines.append(
                "# checkpoint each block: torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)"
            )
    if plan.parallelism.strategy == "fsdp":
        lines.append(
            f"# {plan.world_size} ranks: fully_shard each block, then the model, as the plan assumed "
            f"({plan.parallelism.describe(plan.world_size)}); give the loader a DistributedSampler"
        )
    elif plan.world_size > 1:
        lines.append(
            f"# {plan.world_size} ranks: wrap the model in DistributedDataParallel and give the loader a "
            "DistributedSampler"
        )
    scaler = precision == "fp16-mixed"
    if scaler:
        lines.append('scaler = torch.amp.GradScaler("cuda")')
    scaler_argument = ", scaler=scaler" if scaler else ""
    lines += [
        f"accumulator = GradientAccumulator(model, optimizer{scaler_argument}, max_grad_norm=1.0)",
        "loader = torch.utils.data.DataLoader(dataset, batch_size=sum(MICRO_BATCH_SIZES), shuffle=True)",
        "",
        "",
        "def micro_batches(batch, sizes):",
        "    # Samples along dim 0; the epoch's short last batch gives fewer, smaller pieces.",
        "    total, start = len(next(iter(batch.values()))), 0",
        "    for size in sizes:",
        "        if start < total:",
        "            yield {key: value[start : start + size] for key, value in batch.items()}",
        "        start += size",
        "",
        "",
        "for batch in loader:",
        "    pieces = list(micro_batches(batch, MICRO_BATCH_SIZES))",
        "    for index, piece in enumerate(pieces):",
        "        last = index == len(pieces) - 1",
        "        with accumulator.micro_batch(last=last):",
    ]
    dtype = _autocast(precision)
    if dtype is not None:
        lines += [
            f'            with torch.autocast("cuda", dtype={dtype}):',
            "                # the loss SUMMED over the piece's items (tokens under the mask, or samples)",
            "                loss_sum, num_items = loss_and_count(model, piece)",
        ]
    else:
        lines += [
            "            # the loss SUMMED over the piece's items (tokens under the mask, or samples)",
            "            loss_sum, num_items = loss_and_count(model, piece)",
        ]
    lines += [
        "            accumulator.backward(loss_sum, num_items, last=last)",
        "    accumulator.step()  # exact: the mean over every item of the window",
    ]
    return "\n".join(lines)


def trainer_snippet(plan: Plan) -> str:
    """Hugging Face `TrainingArguments` that apply the plan (an even split: the Trainer takes one
    micro-batch size)."""
    per_rank = plan.effective_batch_size // plan.world_size
    micro, steps = plan.micro_batch_size, plan.accumulation_steps
    lines = [
        f"# Plan {plan.id}: {_comment_safe(plan.workload.describe())} on {_comment_safe(plan.device.name)}",
    ]
    if plan.micro_batch_sizes:
        micro = max(divisors_up_to(per_rank, plan.micro_batch_size))
        steps = per_rank // micro
        lines.append(
            f"# The plan splits each window unevenly ({describe_split(plan)}); the Trainer needs one size:"
        )
        lines.append(f"# {micro} × {steps} reaches the same effective batch with more steps.")
    lines += [
        "from transformers import TrainingArguments",
        "",
        "args = TrainingArguments(",
        '    output_dir="output",',
        f"    per_device_train_batch_size={micro},",
        f"    gradient_accumulation_steps={steps},",
        *(
            [f"    per_device_eval_batch_size={plan.eval_micro_batch_size},"]
            if plan.eval_micro_batch_size
            else []
        ),
        # The name every transformers release knows; 5.x also calls it activation_checkpointing.
        f"    gradient_checkpointing={plan.gradient_checkpointing},  # 5.x: activation_checkpointing",
    ]
    if plan.gradient_checkpointing:
        lines.append('    gradient_checkpointing_kwargs={"use_reentrant": False},')
    precision = plan.workload.precision
    if precision == "bf16-mixed":
        lines.append("    bf16=True,")
    elif precision == "fp16-mixed":
        lines.append("    fp16=True,")
    optimizer = plan.workload.optimizer
    if optimizer.name == "adamw":
        lines.append(
            f'    optim="{"adamw_torch_fused" if optimizer.implementation == "fused" else "adamw_torch"}",'
        )
    elif optimizer.name == "adafactor":
        lines.append('    optim="adafactor",')
    lines.append(")")
    if plan.world_size > 1:
        lines.append(f"# launch on {plan.world_size} processes: torchrun --nproc-per-node ... train.py")
    if precision == "bf16":
        lines.append("# bf16 weights: load the model with torch_dtype=torch.bfloat16")
    return "\n".join(lines)
