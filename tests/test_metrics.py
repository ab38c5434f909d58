"""Prometheus metrics: what they count, and that gunicorn's workers add up to one answer."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx

from app.callback_sender import CallbackSender
from app.metrics import CALLBACKS
from app.runs.store import NewRun
from connectors.outbound import OutboundPolicy
from tests.support.fake_services import CallbackReceiver
from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until, wait_until_ended


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_triggers_fallbacks_durations_requests_and_the_queue(running_app):
    client = running_app.test_client()
    before = client.get("/metrics").get_data(as_text=True)
    run = client.post("/trigger", json={"connector_id": "numbers"}).json
    wait_until_ended(client, run["status_url"])
    client.post("/trigger", json={"connector_id": "numbers"}, headers={"Idempotency-Key": "m-1"})
    client.post("/trigger", json={"connector_id": "numbers"}, headers={"Idempotency-Key": "m-1"})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    after = response.get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("flowgate_triggers_total", kind="connector", backend="local", outcome="accepted") == 2
    assert delta("flowgate_triggers_total", kind="connector", backend="local", outcome="duplicate") == 1
    assert delta("flowgate_fallbacks_total", reason="prefect_not_configured") == 2
    assert delta("flowgate_run_duration_seconds_count", kind="connector", target="numbers", status="completed") >= 1
    # the first run of `numbers` created its table (columns n, square); a second one appends, changing nothing
    assert delta("flowgate_schema_changes_total", target="numbers", kind="new_table") == 1
    assert delta("flowgate_schema_changes_total", target="numbers", kind="new_column") == 2
    assert delta("flowgate_runs_total", kind="connector", backend="local", status="completed") >= 1
    assert delta("flowgate_http_request_duration_seconds_count", endpoint="/trigger", method="POST", status="202") == 3
    assert sample(after, "flowgate_executor_slots") == 2 and sample(after, "flowgate_executors") == 1


def test_a_queued_run_cancelled_is_counted_as_ended(client):
    before = client.get("/metrics").get_data(as_text=True)
    run = client.post("/trigger", json={"connector_id": "numbers"}).json  # no executor here: it stays queued
    assert client.post(f"/api/v1/runs/{run['run_id']}/cancel").json["status"] == "cancelled"
    after = client.get("/metrics").get_data(as_text=True)
    labels = {"kind": "connector", "backend": "local", "status": "cancelled"}
    assert sample(after, "flowgate_runs_total", **labels) - sample(before, "flowgate_runs_total", **labels) == 1


def test_callback_attempts_are_counted_by_outcome(app):
    store = app.extensions["flowgate"].store
    receiver = CallbackReceiver()
    receiver.failures = 1
    try:
        run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                         concurrency_key="k", callback_url=f"{receiver.url}/hook"))
        store.cancel(run.id)  # ended: its callback is due
        before = {outcome: CALLBACKS.labels(outcome)._value.get() for outcome in ("delivered", "retrying", "failed")}
        sender = CallbackSender(store, OutboundPolicy.parse(f"127.0.0.1:{receiver.port}"), "secret",
                                backoff_seconds=0.05, poll_seconds=0.05)
        sender.start()
        try:
            wait_until(lambda: CALLBACKS.labels("delivered")._value.get() > before["delivered"], 30, "a delivery")
        finally:
            sender.stop()
        counted = {outcome: CALLBACKS.labels(outcome)._value.get() - before[outcome] for outcome in before}
        assert counted == {"delivered": 1, "retrying": 1, "failed": 0}
    finally:
        receiver.stop()


def test_every_gunicorn_worker_answers_the_same_sums(workdir):
    server = GunicornServer(workdir, workers=3).start()
    try:
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda i: httpx.post(f"{server.url}/trigger", headers={"Connection": "close"},
                                                          json={"connector_id": "numbers"}).status_code, range(30)))
        assert statuses == [202] * 30
        seen = set()
        for _ in range(12):  # new connections land on different workers
            text = httpx.get(f"{server.url}/metrics", headers={"Connection": "close"}).text
            seen.add(sample(text, "flowgate_triggers_total", kind="connector", backend="local", outcome="accepted"))
        assert seen == {30.0}, seen  # one sum, whichever worker answered
    finally:
        server.kill()


def series(text: str) -> set[str]:
    """The names and labels of every sample in Prometheus' text format."""
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_inline_workflows_add_no_series_whatever_their_ids(running_app):
    client = running_app.test_client()
    inline = {"nodes": [{"id": "out", "type": "output", "config": {"value": 1}}]}

    def execute(ids: range) -> None:
        runs = [client.post(f"/api/workflow/caller-chosen-{i}/execute", json={"workflow": inline}).json["executionId"]
                for i in ids]
        for run_id in runs:
            wait_until_ended(client, f"/api/v1/runs/{run_id}")

    execute(range(3))  # every series these calls touch exists from here on...
    client.get("/metrics")  # ...and the scrape's own (its first request's series appears after it answered)
    before = client.get("/metrics").get_data(as_text=True)
    execute(range(3, 23))
    after = client.get("/metrics").get_data(as_text=True)
    assert "caller-chosen" not in after
    assert series(after) == series(before)  # 20 new ids, not one new series
    count = {"kind": "workflow", "target": "inline", "status": "completed"}
    assert sample(after, "flowgate_run_duration_seconds_count", **count) - sample(
        before, "flowgate_run_duration_seconds_count", **count) == 20


def test_made_up_methods_and_paths_add_no_series(client):
    # Without a key on the open paths: each made-up method or path must not become a series of its own.
    for i in range(3):  # every series these calls touch exists from here on
        client.open("/health", method=f"ZZWORG{i}")
        client.get(f"/no-such-path-{i}")
    client.get("/metrics")
    before = client.get("/metrics").get_data(as_text=True)
    for i in range(3, 23):
        assert client.open("/health", method=f"ZZWORG{i}").status_code == 405
        assert client.open(f"/ui/made-up-{i}", method=f"QQ{i}").status_code == 405
        assert client.get(f"/no-such-path-{i}").status_code == 404
    after = client.get("/metrics").get_data(as_text=True)
    assert "ZZWORG" not in after and "made-up" not in after and "no-such-path" not in after
    assert series(after) == series(before)
    assert sample(after, "flowgate_http_request_duration_seconds_count", endpoint="(unmatched)", method="other",
                  status="405") - sample(before, "flowgate_http_request_duration_seconds_count",
                                         endpoint="(unmatched)", method="other", status="405") == 40
