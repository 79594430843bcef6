"""The plan pages' view models, from stored plans and their probes: the list of past plans (one
`PlanView` a row, filters and paging) and one plan with its charts, trials, snippets and request."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup
from sqlalchemy.orm import Session

from api.charts import ChartSeries, memory_chart, throughput_chart
from storage import repository
from tuner.errors import NotFoundError
from tuner.integrations.snippets import loop_snippet, trainer_snippet
from tuner.results import Plan, ProbeResult, split_formula

BACKENDS = ("cuda", "estimate")
DEFAULT_PAGE_SIZE = 25


@dataclass(frozen=True)
class PlanView:
    """One plan as the pages show it."""

    plan: Plan
    id: int
    model: str
    family: str
    parameter_count: int | None
    split: str
    """`micro × accumulation × world`, or the uneven micro-batches of one window (`split_formula`)."""
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
        split=split_formula(plan),
        peak_fraction=None
        if peak is None or plan.memory_budget_bytes <= 0
        else peak / plan.memory_budget_bytes,
    )


def _probes(session: Session, probe_ids: Iterable[int]) -> dict[int, ProbeResult]:
    """The probes with these ids that are still stored (each read once)."""
    found: dict[int, ProbeResult] = {}
    for probe_id in dict.fromkeys(probe_ids):
        try:
            found[probe_id] = repository.get_probe(session, probe_id=probe_id)
        except NotFoundError:
            continue
    return found


def _filter(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def plan_list_context(
    session: Session,
    *,
    model: str | None,
    device: str | None,
    backend: str | None,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    """`plans.html`'s context: one page of past plans, newest first, under the filters (a blank
    one is no filter), with links to the pages before and after that keep the filters."""
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

    return {
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
    }


def _plan_probe_ids(plan: Plan) -> list[tuple[str, int]]:
    """(checkpointing label, probe id), checkpointing off first."""
    pairs = sorted(plan.probe_ids.items(), key=lambda item: item[0] != "off")
    if not pairs and plan.probe_id is not None:
        pairs = [("on" if plan.gradient_checkpointing else "off", plan.probe_id)]
    return pairs


def plan_page_context(session: Session, plan_id: int) -> dict[str, Any]:
    """`plan.html`'s context for the stored plan `plan_id` (`NotFoundError` where there is none):
    its probes (those still stored; the ids of the others), charts, snippets and request."""
    plan = repository.get_plan(session, plan_id=plan_id)
    plan_request = repository.get_plan_request(session, plan_id=plan_id)
    labelled = _plan_probe_ids(plan)
    if plan.eval_probe_id is not None:
        labelled.append(("eval", plan.eval_probe_id))
    probes = _probes(session, [probe_id for _, probe_id in labelled])
    series_probes = [(label, probes[pid]) for label, pid in labelled if pid in probes]
    facts_probe = next((probe for _, probe in series_probes if probe.facts is not None), None)
    series = [
        ChartSeries(label=_series_label(label), trials=probe.trials, memory_line=probe.memory_line)
        for label, probe in series_probes
    ]
    charts = _charts(plan, series)
    return {
        "view": plan_view(plan, facts_probe),
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
    }


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
