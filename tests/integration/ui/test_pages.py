"""The pages as HTTP answers of a real server on a seeded database: rows, filters, pagination,
the plan page's chart, snippets and request, the jobs page, 404s, escaping and headers."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html import unescape

import httpx
import pytest

from tests.integration.ui.conftest import UiServer
from tests.integration.ui.seeding import L4, ODD_DEVICE, SCRIPT_CONFIG_KEY, SCRIPT_NAME, SeededPlan

SVG = "{http://www.w3.org/2000/svg}"
_ROW_LINK = re.compile(r'<td><a href="/ui/plans/(\d+)">#\d+</a></td>')


def _listed_ids(html: str) -> list[int]:
    return [int(found) for found in _ROW_LINK.findall(html)]


def _newest_first(plans: list[SeededPlan]) -> list[int]:
    return [p.id for p in sorted(plans, key=lambda p: p.id, reverse=True)]


def _svg(html: str, css_class: str) -> ET.Element:
    match = re.search(rf'<svg [^>]*class="chart {css_class}".*?</svg>', html, re.S)
    assert match, f"no {css_class} SVG in the page"
    return ET.fromstring(match.group(0))


def test_ui_redirects_to_the_plan_list(http: httpx.Client) -> None:
    response = http.get("/ui")
    assert response.status_code == 307 and response.headers["location"] == "/ui/plans"


def test_the_stylesheet_is_served_and_the_pages_forbid_scripts(http: httpx.Client) -> None:
    css = http.get("/ui/static/tuner.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@media" in css.text and "overflow-x: auto" in css.text
    page = http.get("/ui/plans")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert '<link rel="stylesheet" href="/ui/static/tuner.css">' in page.text
    assert "<script" not in page.text.lower()


def test_the_list_shows_every_seeded_plan_newest_first(http: httpx.Client, ui_server: UiServer) -> None:
    page = http.get("/ui/plans")
    assert page.status_code == 200
    assert _listed_ids(page.text) == _newest_first(ui_server.plans)
    assert f"Plans 1–{len(ui_server.plans)} of {len(ui_server.plans)}" in page.text
    gpt2 = next(p for p in ui_server.plans if p.model == "gpt2")
    assert "124.4M params" in page.text and gpt2.device.name in page.text


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        ({"model": "gpt2"}, lambda p: p.model == "gpt2"),
        ({"device": L4.name}, lambda p: p.device == L4),
        ({"backend": "estimate"}, lambda p: p.backend == "estimate"),
        ({"model": "gpt2", "backend": "cuda"}, lambda p: p.model == "gpt2" and p.backend == "cuda"),
        (
            {"model": "llama", "device": L4.name, "backend": "estimate"},
            lambda p: p.model == "llama" and p.device == L4,
        ),
        ({"model": SCRIPT_NAME}, lambda p: p.model == SCRIPT_NAME),
        ({"device": ODD_DEVICE.name}, lambda p: p.device == ODD_DEVICE),
    ],
)
def test_filters_narrow_the_list(
    http: httpx.Client, ui_server: UiServer, params: dict[str, str], keep: Callable[[SeededPlan], bool]
) -> None:
    expected = _newest_first([p for p in ui_server.plans if keep(p)])
    assert 0 < len(expected) < len(ui_server.plans)
    page = http.get("/ui/plans", params=params)
    assert _listed_ids(page.text) == expected
    assert f"of {len(expected)} matching" in page.text
    # The form shows the filters in force.
    for name, value in params.items():
        if name == "backend":
            assert f'<option value="{value}" selected>' in page.text
        else:
            assert re.search(rf'name="{name}" value="([^"]*)"', page.text).group(1) == _escaped(value)  # type: ignore[union-attr]


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")


def test_a_filter_that_matches_nothing_says_so(http: httpx.Client) -> None:
    page = http.get("/ui/plans", params={"model": "no-such-model"})
    assert _listed_ids(page.text) == [] and "No plans match these filters." in page.text


def test_pages_of_five_walk_through_every_plan_keeping_the_filters(
    http: httpx.Client, ui_server: UiServer
) -> None:
    seen: list[int] = []
    url: str | None = "/ui/plans?limit=5"
    pages = 0
    while url:
        page = http.get(unescape(url))
        ids = _listed_ids(page.text)
        assert 0 < len(ids) <= 5
        assert f"Plans {len(seen) + 1}–{len(seen) + len(ids)} of {len(ui_server.plans)}" in page.text
        seen += ids
        pages += 1
        found = re.search(r'<a class="button secondary" rel="next" href="([^"]+)">', page.text)
        url = found.group(1) if found else None
        if url:
            assert "limit=5" in url
    assert seen == _newest_first(ui_server.plans) and pages == 3
    filtered = http.get("/ui/plans", params={"model": "gpt2", "limit": 2})
    next_url = unescape(re.search(r'rel="next" href="([^"]+)"', filtered.text).group(1))  # type: ignore[union-attr]
    assert "model=gpt2" in next_url and "limit=2" in next_url and "offset=2" in next_url
    second = http.get(next_url)
    gpt2 = _newest_first([p for p in ui_server.plans if p.model == "gpt2"])
    assert _listed_ids(second.text) == gpt2[2:4]
    previous = unescape(re.search(r'rel="prev" href="([^"]+)"', second.text).group(1))  # type: ignore[union-attr]
    assert _listed_ids(http.get(previous).text) == gpt2[:2]


def test_the_plan_page_has_the_memory_chart_with_the_capacity_line(
    http: httpx.Client, ui_server: UiServer
) -> None:
    seeded = next(p for p in ui_server.plans if p.model == "gpt2" and p.backend == "cuda")
    page = http.get(f"/ui/plans/{seeded.id}")
    assert page.status_code == 200
    memory = _svg(page.text, "memory-chart")
    capacity = [el for el in memory.iter() if el.get("class") == "capacity-line"]
    budget = [el for el in memory.iter() if el.get("class") == "budget-line"]
    chosen = [el for el in memory.iter() if el.get("class") == "chosen-line"]
    assert [el.get("data-bytes") for el in capacity] == [str(seeded.device.total_memory_bytes)]
    assert [el.get("data-bytes") for el in budget] == [str(seeded.plan.memory_budget_bytes)]
    assert [el.get("data-batch-size") for el in chosen] == [str(seeded.plan.micro_batch_size)]
    labels = [el.get("data-label") for el in memory.iter() if el.get("class") == "series"]
    assert labels == ["checkpointing off", "checkpointing on"]
    throughput = _svg(page.text, "throughput-chart")
    assert any(el.get("class") == "trial-point throughput" for el in throughput.iter())
    for warning in seeded.plan.warnings:
        assert warning in unescape(page.text)


def test_an_estimate_plan_has_no_throughput_chart(http: httpx.Client, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.backend == "estimate")
    page = http.get(f"/ui/plans/{seeded.id}").text
    assert 'class="chart memory-chart"' in page and 'class="chart throughput-chart"' not in page
    assert "No throughput was measured" in page


def test_the_snippets_apply_the_plan(http: httpx.Client, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.model == "llama" and p.plan.gradient_checkpointing)
    page = unescape(http.get(f"/ui/plans/{seeded.id}").text)
    plan = seeded.plan
    assert f"MICRO_BATCH_SIZE = {plan.micro_batch_size}" in page
    assert f"ACCUMULATION_STEPS = {plan.accumulation_steps}" in page
    assert "accumulator = GradientAccumulator(model, optimizer" in page
    assert 'gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})' in page
    assert f"per_device_train_batch_size={plan.micro_batch_size}," in page
    assert f"gradient_accumulation_steps={plan.accumulation_steps}," in page
    assert "gradient_checkpointing=True," in page and "bf16=True," in page


def test_the_request_is_shown_as_pretty_json(http: httpx.Client, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.model == SCRIPT_NAME)
    page = http.get(f"/ui/plans/{seeded.id}").text
    shown = re.search(r'<pre class="json" id="request-json"><code>(.*?)</code></pre>', page, re.S)
    assert shown is not None
    request = json.loads(unescape(shown.group(1)))
    assert request["effective_batch_size"] == seeded.plan.effective_batch_size
    assert request["workload"]["model"]["config"][SCRIPT_CONFIG_KEY] == 1
    assert '\n  "workload": {' in unescape(shown.group(1))


def test_user_text_is_escaped_everywhere(http: httpx.Client, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.model == SCRIPT_NAME)
    for path in ("/ui/plans", f"/ui/plans/{seeded.id}", f"/ui/plans?model={SCRIPT_NAME}"):
        html = http.get(path, params=None).text
        assert "<script" not in html.lower(), path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
    listing = http.get("/ui/plans").text
    assert "<b>7</b>" not in listing and "Lab card &#34;&lt;b&gt;7&lt;/b&gt;&#34; &amp; co" in listing
    detail = http.get(f"/ui/plans/{seeded.id}").text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in detail


def test_the_jobs_page_shows_queued_and_running_probes(http: httpx.Client, ui_server: UiServer) -> None:
    page = http.get("/ui/jobs")
    assert page.status_code == 200
    text = unescape(page.text)
    running = text.index(f'href="/v1/jobs/{ui_server.jobs.running_id}"')
    queued = text.index(f'href="/v1/jobs/{ui_server.jobs.queued_id}"')
    assert running < queued  # running first
    assert "2 trials (checkpointing off); last: micro-batch 48 fit" in text
    # No worker runs beside this server: the queued job says so instead of waiting silently.
    assert "no live cuda worker can run it yet" in text or "no live estimate worker can run it yet" in text
    assert "1 running, 1 queued" in text
    assert "llama" in text and "gpt2" in text


@pytest.mark.parametrize(
    "path", ["/ui/plans/999999", "/ui/plans/abc", "/ui/plans/99999999999999999999", "/ui/nowhere"]
)
def test_unknown_pages_are_a_404_page(http: httpx.Client, path: str) -> None:
    response = http.get(path)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>Not found</h1>" in response.text
    assert response.headers["content-security-policy"]


def test_bad_paging_is_a_422_not_a_500(http: httpx.Client) -> None:
    assert http.get("/ui/plans", params={"limit": 0}).status_code == 422
    assert http.get("/ui/plans", params={"offset": -1}).status_code == 422
