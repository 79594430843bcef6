"""The pages in a real headless Chromium against a real server: the list shows the seeded rows,
the filter form and the pager work, the plan page draws the SVG chart with the capacity line, a
model named `<script>alert(1)</script>` shows as text, and the pages fit a phone. A screenshot of
each page at laptop and phone width goes to `test-artifacts/ui/`."""

from __future__ import annotations

from typing import Any

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.integration.ui.conftest import LAPTOP_WIDTH, PHONE_WIDTH, UiServer, screenshot, set_viewport
from tests.integration.ui.seeding import SCRIPT_NAME

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _open(driver: Any, url: str, width: int = LAPTOP_WIDTH) -> None:
    set_viewport(driver, width)
    driver.get(url)
    _assert_no_script_ran(driver)


def _assert_no_script_ran(driver: Any) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        pass
    else:
        text = alert.text
        alert.dismiss()
        pytest.fail(f"a script ran and raised an alert: {text!r}")
    assert driver.find_elements(By.TAG_NAME, "script") == []


def _click_and_load(driver: Any, element: Any) -> None:
    """Click a link or button that navigates, and wait until the next page has replaced this one.

    A click returns before the navigation ends; reading the page at once can find the old
    document's elements, which go stale under the reader.
    """
    old_page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(driver, 30)
    wait.until(expected_conditions.staleness_of(old_page))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    _assert_no_script_ran(driver)


def _row_ids(driver: Any) -> list[int]:
    links = driver.find_elements(By.CSS_SELECTOR, "table.plans tbody td:first-child a")
    return [int(link.text.lstrip("#")) for link in links]


def _screenshots(driver: Any, name: str) -> None:
    for width in (LAPTOP_WIDTH, PHONE_WIDTH):
        path = screenshot(driver, name, width)
        assert path.stat().st_size > 5_000
        if width == PHONE_WIDTH:
            # Nothing but the tables' and charts' own scrollers is wider than a phone.
            page_width = driver.execute_script("return document.documentElement.scrollWidth")
            assert page_width <= PHONE_WIDTH, f"{name} is {page_width} px wide on a {PHONE_WIDTH} px phone"


def test_the_list_shows_the_seeded_rows(browser: Any, ui_server: UiServer) -> None:
    _open(browser, ui_server.url("/ui/plans"))
    expected = sorted((p.id for p in ui_server.plans), reverse=True)
    assert _row_ids(browser) == expected
    names = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "table.plans .model-name")]
    assert SCRIPT_NAME in names  # the literal text, shown, not run
    assert browser.find_element(By.ID, "plan-count").text == f"Plans 1–{len(expected)} of {len(expected)}"
    _screenshots(browser, "plans")
    set_viewport(browser, PHONE_WIDTH)
    scroller = browser.find_element(By.CSS_SELECTOR, ".table-scroll")
    assert browser.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", scroller)


def test_the_filter_form_narrows_the_rows(browser: Any, ui_server: UiServer) -> None:
    _open(browser, ui_server.url("/ui/plans"))
    browser.find_element(By.NAME, "model").send_keys("gpt2")
    Select(browser.find_element(By.NAME, "backend")).select_by_value("cuda")
    _click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]"))
    expected = sorted(
        (p.id for p in ui_server.plans if p.model == "gpt2" and p.backend == "cuda"), reverse=True
    )
    assert 1 < len(expected) < len(ui_server.plans)
    assert _row_ids(browser) == expected
    assert "model=gpt2" in browser.current_url and "backend=cuda" in browser.current_url
    backends = {el.text for el in browser.find_elements(By.CSS_SELECTOR, "table.plans .badge")}
    assert backends == {"cuda"}
    _screenshots(browser, "plans-filtered")
    _click_and_load(browser, browser.find_element(By.LINK_TEXT, "Clear"))
    assert len(_row_ids(browser)) == len(ui_server.plans)


def test_the_pager_walks_through_every_plan(browser: Any, ui_server: UiServer) -> None:
    _open(browser, ui_server.url("/ui/plans?limit=5"))
    seen = _row_ids(browser)
    while browser.find_elements(By.CSS_SELECTOR, "a[rel=next]"):
        _click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "a[rel=next]"))
        seen += _row_ids(browser)
    assert seen == sorted((p.id for p in ui_server.plans), reverse=True)
    assert browser.find_element(By.CSS_SELECTOR, ".pager-total").text == f"{len(ui_server.plans)} plans"
    _click_and_load(browser, browser.find_element(By.CSS_SELECTOR, "a[rel=prev]"))
    assert _row_ids(browser) == seen[5:10]


def test_the_plan_page_draws_the_memory_chart(browser: Any, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.model == "gpt2" and p.backend == "cuda")
    _open(browser, ui_server.url("/ui/plans"))
    _click_and_load(
        browser, browser.find_element(By.CSS_SELECTOR, f'a.model-name[href="/ui/plans/{seeded.id}"]')
    )
    assert browser.current_url.endswith(f"/ui/plans/{seeded.id}")
    chart = browser.find_element(By.CSS_SELECTOR, "svg.memory-chart")
    assert chart.is_displayed() and chart.size["width"] > 400
    capacity = chart.find_element(By.CSS_SELECTOR, "line.capacity-line")
    assert capacity.get_attribute("data-bytes") == str(seeded.device.total_memory_bytes)
    assert capacity.is_displayed()
    title = chart.find_element(By.CSS_SELECTOR, "title").get_attribute("textContent")
    assert title.startswith("Peak memory of gpt2")
    points = chart.find_elements(By.CSS_SELECTOR, ".trial-point")
    assert len(points) >= 6
    assert browser.find_element(By.CSS_SELECTOR, "svg.throughput-chart").is_displayed()
    assert "GradientAccumulator" in browser.find_element(By.ID, "loop-snippet").text
    _screenshots(browser, "plan")


def test_a_script_in_a_model_name_renders_as_text(browser: Any, ui_server: UiServer) -> None:
    seeded = next(p for p in ui_server.plans if p.model == SCRIPT_NAME)
    _open(browser, ui_server.url(f"/ui/plans/{seeded.id}"))
    assert browser.find_element(By.CSS_SELECTOR, "h1 .model-name").text == SCRIPT_NAME
    assert SCRIPT_NAME in browser.title
    assert "<script>alert(2)</script>" in browser.find_element(By.ID, "request-json").text
    _assert_no_script_ran(browser)
    _screenshots(browser, "plan-script-name")


def test_the_jobs_page_lists_active_probes(browser: Any, ui_server: UiServer) -> None:
    _open(browser, ui_server.url("/ui/jobs"))
    statuses = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "table.jobs .badge")]
    assert statuses == ["running", "queued"]
    progress = browser.find_element(By.CSS_SELECTOR, "table.jobs td.progress").text
    assert "2 trials" in progress
    _screenshots(browser, "jobs")


def test_an_unknown_plan_is_a_not_found_page(browser: Any, ui_server: UiServer) -> None:
    _open(browser, ui_server.url("/ui/plans/424242"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    assert "424242" in browser.find_element(By.CSS_SELECTOR, "p.lead").text
    _screenshots(browser, "not-found")
