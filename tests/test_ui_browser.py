"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real gunicorn with API keys.

Skipped with the reason when Playwright or a Chromium binary is missing, failed instead when
FLOWGATE_REQUIRE_BROWSER=1 (CI sets it). Every wait is on a condition (Playwright's expect), never a sleep.
Each page's screenshot lands in var/screenshots/ (FLOWGATE_SCREENSHOTS=docs/screenshots refreshes docs/dashboard.md's).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from app.runs.store import RunStore
from connectors.demo import build_shop_db
from tests.support.fake_services import EchoService
from tests.support.gunicorn_server import ROOT, GunicornServer
from tests.support.run_history import PastRun, add_past_runs
from tests.support.workdir import CONNECTORS_YAML

READER, TRIGGERER, ADMIN = "ui-reader-key-0123456789", "ui-trigger-key-0123456789", "ui-admin-key-0123456789"
NIGHTLY = """
  nightly:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}
"""
# var/ (ignored by git) unless asked: FLOWGATE_SCREENSHOTS=docs/screenshots refreshes docs/dashboard.md's pictures.
SCREENSHOTS = Path(os.environ.get("FLOWGATE_SCREENSHOTS", ROOT / "var" / "screenshots"))
# `fetch` calls a gate the test opens once it has seen the node running (a timed delay could end before a busy
# machine's browser had signed in and polled), then the rest fan out and join.
WORKFLOW = """
description: A step held until it is let go, then a fan-out and a join
nodes:
  - {id: start, type: trigger, config: {defaults: {text: hello}}}
  - {id: fetch, type: http, timeout: 600, config: {url: "%(gate)s", timeout: 300}}
  - {id: upper, type: transform, config: {value: "{{ inputs.text | upper }}"}}
  - {id: count, type: transform, config: {value: "{{ inputs.text | length }}"}}
  - {id: combine, type: join}
  - {id: result, type: output, config: {value: {upper: "{{ nodes.upper.output }}"}}}
connections:
  - {from: start, to: fetch}
  - {from: fetch, to: upper}
  - {from: fetch, to: count}
  - {from: upper, to: combine}
  - {from: count, to: combine}
  - {from: combine, to: result}
"""
GREET = """
description: Says hello to whoever the caller names
nodes:
  - {id: start, type: trigger, config: {defaults: {name: world}}}
  - {id: shout, type: transform, config: {value: "hello {{ inputs.name | upper }}{{ inputs.punctuation or '' }}"}}
  - {id: result, type: output, config: {value: "{{ nodes.shout.output }}"}}
connections:
  - {from: start, to: shout}
  - {from: shout, to: result}
"""
# An execution that stays running until cancelled (the node's own timeout is longer), for triggers to join.
HELD = {"nodes": [{"id": "hold", "type": "delay", "timeout": 400, "config": {"seconds": 300}}]}  # 300: the limit
# The `events` connector's history, written straight into the store (nothing else in this module runs it): what
# its charts must show, point for point.
HISTORY = [PastRun(12, rows={"events": 400, "sessions": 30}),
           PastRun(18, rows={"events": 420, "sessions": 28}, late=2),  # three came from a schedule
           PastRun(9, "failed", "prefect"), PastRun(15, rows={"events": 390}, backend="prefect"),
           PastRun(40, "crashed"), PastRun(14, rows={"events": 410, "sessions": 31}, late=30),
           PastRun(3, "cancelled"), PastRun(16, rows={"events": 450, "sessions": 35}, backend="prefect"),
           PastRun(11, rows={"events": 380}), PastRun(13, rows={"events": 405, "sessions": 33}, late=0.5)]


def chromium_path() -> str | None:
    """The Chromium binary to drive, or None."""
    for candidate in (os.environ.get("FLOWGATE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (requirements-dev.txt)"
    if chromium_path() is None:
        return "no Chromium binary (apt-get install chromium chromium-driver, or set FLOWGATE_CHROMIUM)"
    return None


MISSING = _missing()
if MISSING and os.environ.get("FLOWGATE_REQUIRE_BROWSER"):
    pytest.fail(f"the browser tests are required here: {MISSING}", pytrace=False)
pytestmark = [pytest.mark.skipif(MISSING is not None, reason=MISSING or ""), pytest.mark.long(seconds=25),
              pytest.mark.browser]

if MISSING is None:
    from playwright.sync_api import Page, expect, sync_playwright

    expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def gate():
    """The local service the workflow's `fetch` node calls: it answers once the test sets `gate.gate`."""
    service = EchoService()
    yield service
    service.gate.set()
    service.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, gate):
    """One gunicorn (2 workers) with a read key and a trigger key, the test connectors and one held workflow."""
    workdir = tmp_path_factory.mktemp("ui")
    build_shop_db(workdir / "shop.db", customers=20, orders=100)
    (workdir / "files").mkdir()
    (workdir / "files" / "products.csv").write_text("sku,name,price_cents\nA-1,Apple,120\nB-2,Bread,250\n")
    (workdir / "connectors.yaml").write_text(CONNECTORS_YAML + NIGHTLY)
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "steps.yaml").write_text(WORKFLOW % {"gate": f"{gate.url}/gate"})
    (workdir / "workflows" / "greet.yaml").write_text(GREET)
    server = GunicornServer(workdir, workers=2, ready_headers={"X-API-Key": READER}, FLOWGATE_API_KEYS=f"dash:{READER}:read,ops:{TRIGGERER}:read+trigger,root:{ADMIN}:admin",
                            FLOWGATE_EXECUTOR_THREADS="2",
                            FLOWGATE_HTTP_ALLOWED_HOSTS=f"127.0.0.1:{gate.port}").start()
    store = RunStore(f"sqlite:///{workdir / 'var' / 'flowgate.db'}")  # the gateway's own store: created by now
    add_past_runs(store, "events", HISTORY)
    store.dispose()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh tab (its own session storage: no key yet) that fails the test on a CSP violation or a JS error."""
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 860})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text else None)
    yield page
    context.close()
    assert problems == []


def sign_in(page: Page, key: str, path: str = "/ui/") -> None:
    """Open the page, answer the key prompt, and wait for the key's scopes to show."""
    page.goto(path)
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-dialog button[type=submit]")
    expect(dialog).to_be_hidden()
    expect(page.locator("#who")).to_contain_text("key:")


def shoot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def api(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": TRIGGERER}, timeout=30)


def test_a_run_triggered_from_the_page_completes_and_shows_its_rows(page, server):
    sign_in(page, TRIGGERER, "/ui/#/connectors")
    card = page.locator("[data-connector=shop]")
    card.locator("[data-action=preview]").click()
    card.locator("[data-submit=preview]").click()
    expect(card.locator("[data-resource=orders] tbody tr")).to_have_count(20)
    expect(card.locator(".notice.changes")).to_contain_text("orders new table")  # nothing loaded yet
    shoot(page, "connectors")

    card.locator("[data-action=run]").click()
    card.locator("[data-submit=run]").click()
    card.locator(".output a").click()
    expect(page.locator(".page-head .badge")).to_have_text("completed")
    expect(page.locator("tr[data-table=orders] td.num")).to_have_text("100")
    expect(page.locator("tr[data-table=customers] td.num")).to_have_text("20")
    expect(page.locator(".steps li.step-done")).to_have_count(4)
    expect(page.locator(".notice.changes li[data-changed=orders]")).to_contain_text("new table")  # the first load
    expect(page.locator(".notice.changes li[data-changed=orders]")).to_contain_text("amount_cents bigint")
    expect(page.locator(".timeline")).to_contain_text("local")
    expect(page.locator(".logs")).not_to_contain_text("No log lines yet.")
    shoot(page, "run")

    page.click("a[data-nav=runs]")
    row = page.locator("table.runs tbody tr").first
    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator("td").last).to_have_text("120")
    shoot(page, "runs")


def test_a_workflow_runs_nodes_change_colour_as_they_run(page, server, gate):
    with api(server) as client:
        execution = client.post("/api/workflow/steps/execute", json={"inputs": {"text": "flowgate"}}).json()
    sign_in(page, READER, f"/ui/#/runs/{execution['executionId']}")
    fetch = page.locator("[data-node=fetch]")
    try:
        expect(fetch).to_have_attribute("data-status", "running")
        running_fill = fetch.locator("rect").evaluate("rect => getComputedStyle(rect).fill")
        expect(page.locator("[data-node=upper]")).to_have_attribute("data-status", "pending")
        expect(page.locator(".dag-node")).to_have_count(6)
        expect(page.locator("svg.dag path.edge")).to_have_count(6)
        page.locator("[data-node=start]").click()
        expect(page.locator(".node-panel")).to_contain_text("trigger")
        shoot(page, "workflow")  # mid-run: start completed, fetch running, the rest pending
    finally:
        gate.gate.set()
    for node in ("fetch", "upper", "count", "combine", "result"):
        expect(page.locator(f"[data-node={node}]")).to_have_attribute("data-status", "completed")
    assert fetch.locator("rect").evaluate("rect => getComputedStyle(rect).fill") != running_fill
    page.locator("[data-node=upper]").click()
    expect(page.locator(".node-panel")).to_contain_text('"FLOWGATE"')
    expect(page.locator(".node-panel")).to_contain_text("attempts")
    expect(page.locator(".page-head .badge")).to_have_text("completed")


def test_a_failed_run_shows_its_error_step_and_whether_a_retry_helps(page, server):
    with api(server) as client:
        run = client.post("/trigger", json={"connector_id": "broken"}).json()
    sign_in(page, READER, f"/ui/#/runs/{run['run_id']}")
    expect(page.locator(".page-head .badge")).to_have_text("failed")
    alert = page.locator("[role=alert]").first
    expect(alert).to_contain_text("connector_failed")
    expect(alert).to_contain_text("in step extract")
    expect(alert).to_contain_text("missing.db does not exist")
    expect(alert.locator("[data-failure-class=terminal]")).to_contain_text("A retry will not help")
    expect(page.locator(".page-head")).to_contain_text("failed")
    expect(page.locator("[data-action=rerun]")).to_have_count(0)  # a read key: no Rerun button
    expect(page.locator(".steps li.step-failed")).to_have_text("extract")


def test_a_trigger_key_reruns_a_run_from_its_page(page, server):
    with api(server) as client:
        run = client.post("/trigger", json={"connector_id": "numbers", "labels": {"tenant": "acme"},
                                            "wait": 60}).json()
    sign_in(page, TRIGGERER, f"/ui/#/runs/{run['run_id']}")
    expect(page.locator(".page-head .badge")).to_have_text("completed")
    expect(page.locator(".timeline")).to_contain_text("by ops")
    expect(page.locator("[data-label=tenant]")).to_contain_text("acme")
    expect(page.locator("[data-joined-count]")).to_have_count(0)  # no trigger joined it: nothing said
    page.locator("[data-action=rerun]").click()
    expect(page.locator(".page-head")).to_contain_text(f"rerun of {run['run_id'][:8]}")
    expect(page.locator(".page-head .badge")).to_have_text("completed")
    assert run["run_id"] not in page.url


def test_a_run_page_says_how_many_triggers_joined_the_run(page, server):
    with api(server) as client:
        execute = {"workflow": HELD, "on_conflict": "join"}
        first = client.post("/api/workflow/held/execute", json=execute).json()
        try:
            for _ in range(2):
                joined = client.post("/api/workflow/held/execute", json=execute)
                assert joined.status_code == 200 and joined.json()["joined"] is True, joined.text
                assert joined.json()["executionId"] == first["executionId"]
            sign_in(page, READER, f"/ui/#/runs/{first['executionId']}")
            expect(page.locator(".timeline [data-joined-count]")).to_have_attribute("data-joined-count", "2")
            expect(page.locator(".timeline [data-joined-count]")).to_contain_text("joined by 2 later triggers")
        finally:
            client.post(f"/api/v1/runs/{first['executionId']}/cancel")


def test_the_runs_page_filters_by_every_label_given_and_a_runs_label_links_to_its_runs(page, server):
    with api(server) as client:
        seven, eight, other = (client.post("/trigger", json={"connector_id": "numbers", "labels": labels}).json()["run_id"]
                               for labels in ({"tenant": "ui-acme", "batch": "7"}, {"tenant": "ui-acme", "batch": "8"},
                                              {"tenant": "ui-other", "batch": "7"}))
    rows = page.locator("table.runs tbody tr[data-run-id]")
    sign_in(page, READER, "/ui/#/runs")
    page.locator("input[name=label]").last.fill("tenant:ui-acme")
    page.click(".filters button[type=submit]")
    expect(rows).to_have_count(2)
    assert [rows.nth(i).get_attribute("data-run-id") for i in range(2)] == [eight, seven]
    page.locator("input[name=label]").last.fill("batch:7")  # a second field came with the first label
    page.click(".filters button[type=submit]")
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-run-id") == seven and other not in page.url
    page.locator("input[name=label]").last.fill("Batch=7")  # not a label: the browser does not send it
    page.click(".filters button[type=submit]")
    expect(page.locator("input[name=label]:invalid")).to_have_count(1)
    expect(rows).to_have_count(1)
    page.goto(f"/ui/#/runs/{eight}")
    page.locator("[data-label=tenant]").click()
    expect(rows).to_have_count(2)
    expect(page.locator("input[name=label]").first).to_have_value("tenant:ui-acme")


def test_a_read_key_sees_everything_but_no_run_or_preview_button(page, server):
    page.goto("/ui/#/connectors")
    expect(page.locator("#key-dialog")).to_be_visible()
    shoot(page, "key")
    page.fill("#key-input", "not-a-key-but-long-enough")
    page.click("#key-dialog button[type=submit]")
    expect(page.locator("#key-error")).to_have_text("That key is not valid.")
    page.fill("#key-input", READER)
    page.click("#key-dialog button[type=submit]")
    expect(page.locator("#who")).to_have_text("key: read only")
    expect(page.locator("[data-connector=shop]")).to_be_visible()
    expect(page.locator("[data-connector=shop] dl")).to_contain_text("sql_database")
    expect(page.locator("[data-action=run]")).to_have_count(0)
    expect(page.locator("[data-action=preview]")).to_have_count(0)
    expect(page.locator("[data-connector=nightly] dl")).to_contain_text("Europe/Berlin")
    expect(page.locator("[data-action=pause]")).to_have_count(0)
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("sessionStorage.getItem('flowgate.apiKey')") == READER

    page.click("a[data-nav=workflows]")
    expect(page.locator("[data-workflow=greet] svg.dag")).to_be_visible()
    expect(page.locator("[data-action=run]")).to_have_count(0)

    page.click("a[data-nav=health]")
    expect(page.locator("[data-check=database] .badge")).to_have_text("up")
    expect(page.locator("[data-check=executor]")).to_contain_text("capacity")
    expect(page.locator("[data-check=prefect] .badge")).to_have_text("disabled")
    shoot(page, "health")


def test_an_admin_pauses_and_resumes_a_schedule_and_sees_its_next_fire_time(page, server):
    sign_in(page, ADMIN, "/ui/#/connectors")
    expect(page.locator("#who")).to_have_text("key: admin")
    card = page.locator("[data-connector=nightly]")
    expect(card.locator("dl")).to_contain_text("cron 0 2 * * * (Europe/Berlin)")
    expect(card.locator("dl")).to_contain_text(" 02:00:00+0")  # the next slot, in Berlin's own offset
    card.locator("[data-action=pause]").click()
    expect(card.locator("[data-schedule-state]")).to_have_attribute("data-schedule-state", "paused")
    expect(card.locator("dl")).to_contain_text("paused by root")
    with httpx.Client(base_url=server.url, headers={"X-API-Key": READER}, timeout=30) as client:
        assert client.get("/api/v1/connectors/nightly").json()["schedule"]["state"] == "paused"  # in the store
    card.locator("[data-action=resume]").click()
    expect(card.locator("[data-schedule-state]")).to_have_attribute("data-schedule-state", "active")
    expect(card.locator("[data-action=pause]")).to_be_visible()


def test_a_connectors_history_is_drawn_a_point_per_run_with_status_and_backend_readable_without_colour(page):
    sign_in(page, READER, "/ui/#/connectors/events")
    history = page.locator("[data-history=events]")
    duration = history.locator("svg.chart-duration")
    expect(duration.locator(".point")).to_have_count(len(HISTORY))
    expect(history.locator("svg.chart-strip .point")).to_have_count(len(HISTORY))
    statuses = [run.status for run in HISTORY]
    assert duration.locator(".point").evaluate_all("points => points.map(p => p.dataset.status)") == statuses
    # a bar's height is its duration: the 40 s crash is the tallest, the 3 s cancel the shortest of the ended
    heights = duration.locator("rect.bar").evaluate_all("bars => bars.map(b => b.height.baseVal.value)")
    assert heights.index(max(heights)) == 4 and heights.index(min(heights)) == 6
    # status as a glyph and a title, backend as a shape: nothing needs colour to be read
    assert duration.locator(".point .glyph").all_text_contents() == ["✕", "!", "–"]
    expect(duration.locator(".backend-mark.backend-prefect")).to_have_count(3)
    expect(duration.locator(".backend-mark.backend-local")).to_have_count(7)
    failed_title = duration.locator(".point").nth(2).locator("title")
    expect(failed_title).to_have_text(re.compile(r"failed · prefect · .* · 9\.0 s$"))
    # 7 completed of the 9 that ended so (the cancelled one counts for neither side)
    expect(history.locator("[data-rate]")).to_have_text("78% of 9 ended runs succeeded")
    expect(history.locator("svg.chart-rows [data-table=events] .point")).to_have_count(7)
    expect(history.locator("svg.chart-rows [data-table=sessions] .point")).to_have_count(5)
    lag = history.locator("svg.chart-lag")  # only the three scheduled runs, the 30 s late one the tallest
    expect(lag.locator(".point")).to_have_count(3)
    assert lag.locator(".point").evaluate_all("points => points.map(p => p.dataset.run)") == \
        duration.locator(".point").evaluate_all("points => [1, 5, 9].map(i => points[i].dataset.run)")
    lags = lag.locator("rect.bar").evaluate_all("bars => bars.map(b => b.height.baseVal.value)")
    assert lags.index(max(lags)) == 1
    shoot(page, "connector")

    history.locator(".windows a[href$='window=20']").click()
    expect(page).to_have_url(re.compile(r"#/connectors/events\?window=20$"))
    expect(page.locator("[data-history=events] .windows a.active")).to_have_text("20")
    expect(page.locator("[data-history=events] svg.chart-duration .point")).to_have_count(len(HISTORY))
    page.evaluate("location.hash = '#/runs?target=events'")  # the run list filtered to it: the same history on top
    expect(page.locator("[data-history=events] svg.chart-duration .point")).to_have_count(len(HISTORY))
    expect(page.locator("table.runs tbody tr")).to_have_count(len(HISTORY))
    page.evaluate("location.hash = '#/runs?target=steps'")  # a workflow has no connector history: no card, no error
    expect(page.locator("table.runs")).to_be_visible()
    expect(page.locator("[data-history]")).to_be_hidden()
    expect(page.locator("[role=alert]")).to_have_count(0)


def test_the_workflows_page_draws_each_graph_and_runs_one_with_its_inputs(page):
    sign_in(page, TRIGGERER, "/ui/#/workflows")
    steps = page.locator("[data-workflow=steps]")
    expect(steps.locator(".dag-node")).to_have_count(6)
    expect(steps.locator("svg.dag path.edge")).to_have_count(6)
    expect(steps.locator(".dag-node[data-status]")).to_have_count(0)  # a file, not a run: no states
    card = page.locator("[data-workflow=greet]")
    expect(card.locator(".dag-node")).to_have_count(3)
    expect(card.locator("dl")).to_contain_text("name, punctuation")
    card.locator("[data-action=run]").click()
    expect(card.locator("input[name=name]")).to_have_attribute("placeholder", '"world"')
    card.locator("input[name=name]").fill("flowgate")
    card.locator("input[name=punctuation]").fill("!")
    shoot(page, "workflows")
    card.locator("[data-submit=run]").click()
    expect(card.locator(".latest li a")).to_have_count(1)
    card.locator(".output a").click()
    expect(page.locator(".page-head .badge")).to_have_text("completed")
    page.locator("[data-node=shout]").click()
    expect(page.locator(".node-panel")).to_contain_text("hello FLOWGATE!")
