"""GET /api/v1/runs/<id>/logs: the lines a local run's threads logged, kept in the run store."""
from __future__ import annotations

import time

from tests.support.retried_workflow import run_a_retried_http_node
from tests.support.waiting import wait_until_ended


def test_a_local_runs_lines_are_kept_and_paged(running_app):
    client = running_app.test_client()
    run = client.post("/trigger", json={"connector_id": "numbers"}).json
    wait_until_ended(client, run["status_url"])
    logs = client.get(f"/api/v1/runs/{run['run_id']}/logs").json
    assert logs["source"] == "flowgate" and logs["next_after"] is None
    assert any(line["message"].startswith(f"run {run['run_id']} accepted") for line in logs["items"]), logs
    first = client.get(f"/api/v1/runs/{run['run_id']}/logs?limit=1").json
    assert len(first["items"]) == 1 and first["next_after"] is not None
    rest = client.get(f"/api/v1/runs/{run['run_id']}/logs?after={first['next_after']}").json
    assert first["items"] + rest["items"] == logs["items"]


def test_workflow_node_lines_are_kept_on_the_workflow_run(app_config):
    _, lines = run_a_retried_http_node(app_config)
    assert any("node call attempt 1 failed" in line["message"] and line["logger"] == "flows.engine"
               for line in lines), lines


def test_logs_of_an_unknown_run_or_with_a_bad_query_are_refused(client):
    assert client.get("/api/v1/runs/nope/logs").status_code == 404
    run = client.post("/trigger", json={"connector_id": "numbers"}).json
    for query in ("limit=0", "after=-1", "limit=5000", "unknown=1"):
        response = client.get(f"/api/v1/runs/{run['run_id']}/logs?{query}")
        assert response.status_code == 422, query


def test_a_connector_runs_lines_from_its_own_process_reach_the_runs_logs(running_app):
    client = running_app.test_client()
    run = client.post("/trigger", json={"connector_id": "numbers", "wait": 60}).json
    assert run["status"] == "completed", run
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = client.get(f"/api/v1/runs/{run['run_id']}/logs").json["items"]
        if any("runs in process" in line["message"] for line in lines):
            break
        time.sleep(0.1)
    assert any(line["logger"] == "connectors.isolated" and "runs in process" in line["message"] for line in lines)
