"""Reruns: one ended run again (`source: rerun`), a workflow from its failed nodes without executing the completed
ones again, and a bounded, idempotent bulk rerun by filter."""
from __future__ import annotations

from collections import Counter

import pytest

from app import create_app
from flows.nodes import NODE_TYPES, NodeConfig, NodeContext, NodeFailed, node_type
from tests.support.waiting import wait_until_ended

pytestmark = pytest.mark.long(seconds=30)

CALLS: Counter[str] = Counter()
BROKEN: set[str] = set()


class CountedConfig(NodeConfig):
    key: str


def counted(config: CountedConfig, ctx: NodeContext) -> dict:
    """Counts its executions; fails while its key is BROKEN."""
    CALLS[config.key] += 1
    if config.key in BROKEN:
        raise NodeFailed(f"{config.key} is broken for now", terminal=True)
    return {"key": config.key, "input": ctx.input}


@pytest.fixture
def counted_nodes():
    node_type("counted", CountedConfig)(counted)
    CALLS.clear()
    BROKEN.clear()
    yield
    NODE_TYPES.pop("counted", None)


# a -> b -> c, and a -> d beside b
WORKFLOW = {"nodes": [{"id": key, "type": "counted", "config": {"key": key}} for key in "abcd"],
            "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "a", "to": "d"}]}


def test_a_connector_run_is_rerun_with_its_params_and_the_overrides(running_app):
    client = running_app.test_client()
    first = client.post("/trigger", json={"connector_id": "numbers", "params": {"n": 3}, "wait": 60}).json
    again = client.post(f"/api/v1/runs/{first['run_id']}/rerun", json={"params": {"n": 4}})
    assert again.status_code == 202 and again.json["run_id"] != first["run_id"]
    assert again.json["source"] == "rerun" and again.json["rerun_of"] == first["run_id"]
    done = wait_until_ended(client, again.json["status_url"])
    assert done["status"] == "completed" and done["params"] == {"n": 4} and done["result"]["rows"] == {"numbers": 4}
    plain = client.post(f"/api/v1/runs/{first['run_id']}/rerun").json  # the body is optional
    assert plain["params"] == {"n": 3} and first["source"] == "api" and first["rerun_of"] is None


def test_a_run_that_has_not_ended_is_not_rerun_and_overrides_are_checked(client):
    queued = client.post("/trigger", json={"connector_id": "numbers"}).json  # no executor: it stays queued
    answer = client.post(f"/api/v1/runs/{queued['run_id']}/rerun")
    assert answer.status_code == 409 and answer.json["code"] == "run_not_ended"
    client.post(f"/api/v1/runs/{queued['run_id']}/cancel")
    for body, field in (({"params": {"nope": 1}}, "params.nope"), ({"inputs": {}}, "inputs"),
                        ({"from": "failed"}, "from"), ({"from": "middle"}, "from")):
        answer = client.post(f"/api/v1/runs/{queued['run_id']}/rerun", json=body)
        assert answer.status_code == 422 and answer.json["errors"][0]["field"] == field, answer.json
    assert client.post(f"/api/v1/runs/{'0' * 32}/rerun").status_code == 404


def test_a_workflow_rerun_from_failed_executes_only_the_failed_nodes_and_after(running_app, counted_nodes):
    client = running_app.test_client()
    BROKEN.add("b")
    first = client.post("/api/workflow/wf/execute", json={"workflow": WORKFLOW, "inputs": {"x": 1}, "wait": 60}).json
    assert first["status"] == "failed"
    assert CALLS == Counter({"a": 1, "b": 1, "d": 1})
    BROKEN.clear()
    rerun = client.post(f"/api/v1/runs/{first['executionId']}/rerun", json={"from": "failed"}).json
    done = wait_until_ended(client, rerun["status_url"])
    assert done["status"] == "completed" and done["rerun_of"] == first["executionId"]
    assert CALLS == Counter({"a": 1, "b": 2, "c": 1, "d": 1})  # a and d were not executed again
    nodes = {node["id"]: node for node in client.get(f"/api/workflow/execution/{rerun['run_id']}").json["nodes"]}
    assert {key for key, node in nodes.items() if node["reused"]} == {"a", "d"}
    assert nodes["a"]["output"] == {"key": "a", "input": {"x": 1}} and nodes["c"]["output"]["input"]["key"] == "b"
    whole = wait_until_ended(client, client.post(f"/api/v1/runs/{first['executionId']}/rerun").json["status_url"])
    assert whole["status"] == "completed" and CALLS == Counter({"a": 2, "b": 3, "c": 2, "d": 2})
    again = client.post(f"/api/v1/runs/{done['run_id']}/rerun", json={"from": "failed"})
    assert again.status_code == 409 and again.json["code"] == "run_not_failed"


def test_a_bulk_rerun_lists_with_dry_run_then_reruns_each_run_once(running_app):
    client = running_app.test_client()
    failed = [client.post("/trigger", json={"connector_id": "broken", "wait": 60}).json["run_id"] for _ in range(3)]
    client.post("/trigger", json={"connector_id": "numbers", "wait": 60})
    body = {"filter": {"connector_id": "broken", "status": "failed"}, "limit": 2}
    plan = client.post("/api/v1/runs/rerun", json={**body, "dry_run": True}).json
    assert plan["dry_run"] and plan["more"] and [item["run_id"] for item in plan["items"]] == failed[::-1][:2]
    assert all(item["rerun_run_id"] is None for item in plan["items"])
    assert len(client.get("/api/v1/runs").json["items"]) == 4  # nothing started
    started = client.post("/api/v1/runs/rerun", json=body).json
    assert [item["created"] for item in started["items"]] == [True, True]
    again = client.post("/api/v1/runs/rerun", json=body).json
    assert [item["rerun_run_id"] for item in again["items"]] == [item["rerun_run_id"] for item in started["items"]]
    assert [item["created"] for item in again["items"]] == [False, False]
    reruns = [client.get(f"/api/v1/runs/{item['rerun_run_id']}").json for item in started["items"]]
    assert [(run["source"], run["rerun_of"]) for run in reruns] == [("rerun", run_id) for run_id in failed[::-1][:2]]
    too_many = client.post("/api/v1/runs/rerun", json={"filter": {}, "limit": 101})
    assert too_many.status_code == 422 and too_many.json["errors"][0]["field"] == "limit"


def test_a_rerun_needs_the_trigger_scope(app_config):
    reader, triggerer = "rerun-reader-0123456789", "rerun-trigger-0123456789"
    app = create_app({**app_config, "api_keys": f"r:{reader}:read,t:{triggerer}:read+trigger"})
    try:
        client = app.test_client()
        run = client.post("/trigger", json={"connector_id": "numbers"}, headers={"X-API-Key": triggerer}).json
        client.post(f"/api/v1/runs/{run['run_id']}/cancel", headers={"X-API-Key": triggerer})
        for path in (f"/api/v1/runs/{run['run_id']}/rerun", "/api/v1/runs/rerun"):
            assert client.post(path, json={}, headers={"X-API-Key": reader}).status_code == 403
        assert client.post(f"/api/v1/runs/{run['run_id']}/rerun", headers={"X-API-Key": triggerer}).status_code == 202
    finally:
        app.extensions["flowgate"].store.dispose()
