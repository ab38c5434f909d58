"""No internals in anything a caller reads (issue 16, item 10): hostile JSON is a 4xx, a template given the wrong
kind of value is the node's error, run logs carry no traceback, run errors no server folders."""
from __future__ import annotations

import pytest

from tests.support.problems import assert_problem
from tests.support.waiting import wait_until_ended

WRONG_KIND = "{{ 'a'|wordwrap(5, wrapstring=inputs) }}"



@pytest.mark.parametrize("data", ["[" * 200_000, '{"connector_id": "numbers", "params": {"n": ' + "9" * 5000 + "}}",
                                  '{"a": ' + "{\"a\": " * 100_000 + "1" + "}" * 100_001])
@pytest.mark.parametrize("path", ["/trigger", "/api/workflow/any/execute", "/api/workflow/any/execute-node"])
def test_hostile_json_is_a_400_not_a_500(client, data: str, path: str):
    body = assert_problem(client.post(path, data=data, content_type="application/json"), 400, "malformed_json")
    assert "sys." not in body["detail"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_a_template_given_the_wrong_kind_of_value_is_the_nodes_error(client):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "t", "nodeType": "transform", "node": {"config": {"value": WRONG_KIND}}})
    assert response.status_code == 200
    assert response.json["success"] is False and response.json["error"]["code"] == "template_error"


def test_run_logs_and_run_errors_carry_no_traceback_and_no_server_folders(running_app, workdir):
    client = running_app.test_client()
    workflow = client.post("/api/workflow/x/execute", json={"workflow": {"nodes": [
        {"id": "t", "type": "transform", "config": {"value": WRONG_KIND}}]}}).json["executionId"]
    broken = client.post("/trigger", json={"connector_id": "broken"}).json["run_id"]
    for run_id in (workflow, broken):
        doc = wait_until_ended(client, f"/api/v1/runs/{run_id}")
        assert doc["status"] == "failed"
    read = "\n".join(client.get(path).get_data(as_text=True) for path in (
        f"/api/v1/runs/{workflow}", f"/api/v1/runs/{workflow}/logs", f"/api/workflow/execution/{workflow}",
        f"/api/v1/runs/{broken}", f"/api/v1/runs/{broken}/logs"))
    assert "Traceback" not in read and 'File \\"' not in read
    assert str(workdir) not in read and "/tmp/" not in read
    error = client.get(f"/api/v1/runs/{broken}").json["error"]
    assert "missing.db" in error["message"]  # the reason is still given, without the folders
