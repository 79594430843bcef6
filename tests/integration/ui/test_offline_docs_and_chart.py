"""In a real headless Chromium: `/docs` renders with no network (Swagger UI's files come from the
package, not a CDN), and the memory charts of every seeded plan place failed trials at their
measured peak, never on the chosen micro-batch's line, with no label across a plotted line."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.ui.conftest import OFFLINE_FLAGS, UiServer, chromium_driver, screenshot, set_viewport

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def offline_browser() -> Iterator[Any]:
    with chromium_driver(OFFLINE_FLAGS) as driver:
        yield driver


def test_the_interactive_docs_render_without_a_network(offline_browser: Any, ui_server: UiServer) -> None:
    driver = offline_browser
    set_viewport(driver, 1280)
    with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):
        driver.get("https://cdn.jsdelivr.net/")  # the browser really is offline
    driver.get(ui_server.url("/docs"))
    WebDriverWait(driver, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")
    )
    title = driver.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    assert title.startswith("tuner")
    paths = {
        el.text.replace("\u200b", "") for el in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/v1/plans", "/v1/jobs/{job_id}"} <= paths
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(ui_server.base_url) for url in loaded), loaded
    screenshot(driver, "docs-offline", 1280)


# The geometry each chart is checked by, read from the browser's own layout of the SVG.
CHART_GEOMETRY = """
const svg = arguments[0];
const box = el => { const b = el.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; };
const points = el => el.getAttribute('points').trim().split(/\\s+/).map(p => p.split(',').map(Number));
const crossCentre = g => {
  const l = g.querySelector('line'), at = name => +l.getAttribute(name);
  return [(at('x1') + at('x2')) / 2, (at('y1') + at('y2')) / 2];
};
const chosen = svg.querySelector('.chosen-line');
return {
  labels: [...svg.querySelectorAll('.capacity-line-label, .budget-line-label, .chosen-label')]
    .map(el => ({text: el.textContent, box: box(el)})),
  lines: [...svg.querySelectorAll('.fitted-line, .reserved-line, .allocated-line')].map(points),
  failed: [...svg.querySelectorAll('.trial-point.failed')]
    .map(g => ({centre: crossCentre(g), title: g.querySelector('title').textContent,
                measured: g.classList.contains('measured')})),
  chosen: chosen && [+chosen.getAttribute('x1'), +chosen.getAttribute('y1'), +chosen.getAttribute('y2')],
};
"""


def _segment_crosses_box(a: list[float], b: list[float], box: list[float]) -> bool:
    (x1, y1), (x2, y2) = sorted([a, b])
    left, top, right, bottom = box
    if x2 < left or x1 > right:
        return False
    if x2 == x1:
        return not (max(y1, y2) < top or min(y1, y2) > bottom)
    slope = (y2 - y1) / (x2 - x1)
    ys = [y1 + slope * (min(max(x, x1), x2) - x1) for x in (left, right)]
    return not (max(ys) < top or min(ys) > bottom)


def test_every_memory_chart_keeps_failures_off_the_chosen_line_and_labels_off_the_lines(
    browser: Any, ui_server: UiServer
) -> None:
    measured_failures = 0
    for seeded in ui_server.plans:
        browser.get(ui_server.url(f"/ui/plans/{seeded.id}"))
        chart = browser.find_element(By.CSS_SELECTOR, "svg.memory-chart")
        geometry = browser.execute_script(CHART_GEOMETRY, chart)
        for label in geometry["labels"]:
            for line in geometry["lines"]:
                for a, b in itertools.pairwise(line):
                    assert not _segment_crosses_box(a, b, label["box"]), (seeded.id, label["text"], line)
        x, top, bottom = geometry["chosen"]
        for cross in geometry["failed"]:
            cx, cy = cross["centre"]
            assert not (abs(cx - x) < 6 and top - 5 <= cy <= bottom), (seeded.id, cross["title"])
            if cross["measured"]:
                measured_failures += 1
                assert "peak" in cross["title"]
    # Estimate plans' failures carry the peak the trace measured; each sits there, not in a band.
    assert measured_failures >= 3
    estimate = next(p for p in ui_server.plans if p.backend == "estimate")
    browser.get(ui_server.url(f"/ui/plans/{estimate.id}"))
    screenshot(browser, "plan-estimate-failures", 1280)
