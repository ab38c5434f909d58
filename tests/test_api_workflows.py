"""The workflow endpoints: execute, follow an execution, execute-node, and their bad input."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError
from flows.workflow_registry import WorkflowError, WorkflowRegistry
from tests.support.waiting import wait_until, wait_until_ended

PIPELINE = """
description: fan out and join
nodes:
  - {id: start, type: trigger, config: {defaults: {text: hi}}}
  - {id: a, type: delay, config: {seconds: 1}}  # long enough for b to start before it ends, on a busy machine
  - {id: b, type: delay, config: {seconds: 1}}
  - {id: shout, type: transform, config: {value: "{{ input.text | upper }}"}}  # input: the trigger's output
  - {id: join, type: join}
  - {id: out, type: output, config: {value: {text: "{{ nodes.shout.output }}", joined: "{{ nodes.join.output | length }}"}}}
connections:
  - {from: start, to: a}
  - {from: start, to: b}
  - {from: start, to: shout}
  - {from: a, to: join}
  - {from: b, to: join}
  - {from: shout, to: join}
  - {from: join, to: out}
"""
WITH_CONNECTOR = """
nodes:
  - {id: load, type: connector, config: {connector_id: numbers, params: {n: "{{ inputs.n }}"}}}
  - {id: out, type: output, config: {value: "{{ nodes.load.output.rows.numbers }}"}}
connections: [{from: load, to: out}]
"""
CACHED = """
nodes:
  - {id: slow, type: delay, cache: 600, config: {seconds: 0.2}}
"""
SLEEPY = """
nodes:
  - {id: wait, type: delay, config: {seconds: 30}}  # left alone it ends completed
  - {id: after, type: output}
connections: [{from: wait, to: after}]
"""


@pytest.fixture
def app_config(app_config: dict) -> dict:
    folder = app_config["workflows_dir"]
    folder.mkdir()
    for name, text in {"pipeline": PIPELINE, "with_connector": WITH_CONNECTOR, "cached": CACHED,
                       "sleepy": SLEEPY}.items():
        (folder / f"{name}.yaml").write_text(text)
    return app_config


def test_execute_answers_at_once_and_the_execution_shows_every_node(running_app):
    client = running_app.test_client()
    accepted = client.post("/api/workflow/pipeline/execute", json={"inputs": {"text": "hello"}, "mode": "optimized"})
    assert accepted.status_code == 202
    body = accepted.json
    assert body["success"] is True and body["status"] in ("queued", "running") and body["executionId"]
    assert body["message"].startswith("Workflow execution started in background")
    assert accepted.headers["Location"] == body["statusUrl"]
    done = wait_until_ended(client, body["statusUrl"])
    assert done["status"] == "completed" and done["success"] is True and done["workflowId"] == "pipeline"
    assert done["layers"] == [["start"], ["a", "b", "shout"], ["join"], ["out"]]
    assert done["outputs"] == {"out": {"text": "HELLO", "joined": 3}}
    nodes = {n["id"]: n for n in done["nodes"]}
    assert list(nodes) == ["start", "a", "b", "shout", "join", "out"]
    assert all(n["status"] == "completed" and n["attempts"] == 1 and n["duration_seconds"] is not None
               for n in nodes.values())
    assert nodes["a"]["duration_seconds"] >= 1 and nodes["join"]["layer"] == 2
    # a and b share a layer; that a layer's nodes run at once is proven in test_engine.py by nodes that meet
    assert nodes["a"]["layer"] == nodes["b"]["layer"] == 1
    listed = client.get("/api/v1/runs").json["items"][0]
    assert listed["run_id"] == body["executionId"] and listed["kind"] == "workflow"
    assert listed["workflow_id"] == "pipeline" and listed["connector_id"] is None


def test_legacy_mode_runs_the_nodes_one_after_another(running_app):
    client = running_app.test_client()
    accepted = client.post("/api/workflow/pipeline/execute", json={"mode": "legacy"})
    done = wait_until_ended(client, accepted.json["statusUrl"])
    assert done["status"] == "completed" and done["mode"] == "legacy"
    nodes = sorted(done["nodes"], key=lambda n: n["started_at"])
    assert [n["id"] for n in nodes] == ["start", "a", "b", "shout", "join", "out"]
    for earlier, later in zip(nodes, nodes[1:]):
        assert later["started_at"] >= earlier["finished_at"]
    assert done["outputs"] == {"out": {"text": "HI", "joined": 3}}


def test_an_inline_definition_runs_without_a_file(running_app):
    client = running_app.test_client()
    inline = {"nodes": [{"id": "x", "type": "transform", "config": {"value": "{{ inputs.n * 2 }}"}},
                        {"id": "y", "type": "output"}], "connections": [{"source": "x", "target": "y"}]}
    done = client.post("/api/workflow/adhoc/execute", json={"workflow": inline, "inputs": {"n": 21}, "wait": 30})
    assert done.status_code == 200 and done.json["status"] == "completed"
    assert client.get(done.json["statusUrl"]).json["outputs"] == {"y": 42}


def test_a_connector_node_runs_the_connector_as_a_recorded_run(running_app):
    client = running_app.test_client()
    accepted = client.post("/api/workflow/with_connector/execute", json={"inputs": {"n": 4}})
    done = wait_until_ended(client, accepted.json["statusUrl"])
    assert done["status"] == "completed", done
    load = next(n for n in done["nodes"] if n["id"] == "load")
    assert load["output"]["rows"] == {"numbers": 4} and done["outputs"] == {"out": 4}
    connector_run = client.get(f"/api/v1/runs/{load['output']['run_id']}").json
    assert connector_run["kind"] == "connector" and connector_run["connector_id"] == "numbers"
    assert connector_run["status"] == "completed" and connector_run["params"] == {"n": 4}


def test_the_node_cache_is_shared_through_the_run_store(app_config):
    """Two gateways (as two gunicorn workers would be) on one store: the second answers from the cache."""
    executions = []
    for _ in range(2):
        app = create_app(app_config)
        services = app.extensions["flowgate"]
        services.start()
        try:
            client = app.test_client()
            accepted = client.post("/api/workflow/cached/execute", json={"inputs": {"k": 1}})
            executions.append(wait_until_ended(client, accepted.json["statusUrl"]))
        finally:
            services.stop(timeout=5)
            services.store.dispose()
    assert [e["nodes"][0]["cached"] for e in executions] == [False, True]
    assert executions[1]["nodes"][0]["output"] == executions[0]["nodes"][0]["output"]


def test_cancelling_an_execution_stops_its_nodes(running_app):
    client = running_app.test_client()
    accepted = client.post("/api/workflow/sleepy/execute", json={})
    wait_until(lambda: client.get(accepted.json["statusUrl"]).json["status"] == "running", what="the execution ran")
    cancel = client.post(f"/api/v1/runs/{accepted.json['executionId']}/cancel")
    assert cancel.status_code == 202
    done = wait_until_ended(client, accepted.json["statusUrl"])
    assert done["status"] == "cancelled"
    assert [n["status"] for n in done["nodes"]] == ["cancelled", "cancelled"]


def test_the_same_idempotency_key_gives_the_same_execution(client):
    headers = {"Idempotency-Key": "wf-once"}
    first = client.post("/api/workflow/pipeline/execute", json={}, headers=headers).json
    again = client.post("/api/workflow/pipeline/execute", json={}, headers=headers)
    assert again.json["executionId"] == first["executionId"] and "already accepted" in again.json["message"]
    reused = client.post("/api/workflow/pipeline/execute", json={"inputs": {"other": 1}}, headers=headers)
    assert reused.status_code == 409 and reused.json["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("body, field", [
    ({"mode": "fast"}, "mode"),
    ({"inputs": [1, 2]}, "inputs"),
    ({"unknown": 1}, "unknown"),
    ({"wait": -1}, "wait"),
    ({"wait": 100000}, "wait"),
    ({"workflow": {"nodes": []}}, "workflow.nodes"),
    ({"workflow": {"nodes": [{"id": "a", "type": "teleport"}]}}, "workflow.nodes[0].type"),
    ({"workflow": {"nodes": [{"id": "a", "type": "delay"}]}}, "workflow.nodes[0].config.seconds"),
    ({"workflow": {"nodes": [{"id": "a", "type": "delay", "config": {"seconds": 1, "speed": 2}}]}},
     "workflow.nodes[0].config.speed"),
    ({"workflow": {"nodes": [{"id": "a", "type": "connector", "config": {"connector_id": "nope"}}]}},
     "workflow.nodes[0].config.connector_id"),
    ({"workflow": {"nodes": [{"id": "a", "type": "trigger"}], "connections": [{"from": "a", "to": "b"}]}},
     "workflow.connections[0].target"),
    ({"workflow": {"nodes": [{"id": "a", "type": "trigger"}, {"id": "b", "type": "output"}],
                   "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]}}, "workflow.connections"),
    ({"workflow": {"nodes": [{"id": "a b", "type": "trigger"}]}}, "workflow.nodes.0.id"),
])
def test_bad_execute_input_is_a_422_naming_the_field_and_stores_nothing(client, body, field):
    response = client.post("/api/workflow/pipeline/execute", json=body)
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    assert field in [e["field"] for e in response.json["errors"]], response.json
    assert client.get("/api/v1/runs").json["items"] == []


@pytest.mark.parametrize("path_id, definition, field", [
    ("pipeline", {"nodes": [{"id": "a", "type": "trigger"}]}, "workflow_id"),  # a workflow file's id
    ("numbers", {"nodes": [{"id": "a", "type": "trigger"}]}, "workflow_id"),  # a connector's id
    ("anything", {"id": "pipeline", "nodes": [{"id": "a", "type": "trigger"}]}, "workflow.id"),
    ("anything", {"id": "other", "nodes": [{"id": "a", "type": "trigger"}]}, "workflow.id"),
])
def test_an_inline_definition_cannot_take_a_configured_id(client, path_id, definition, field):
    # Its run, metrics and gateway-signed callback would pass for the configured workflow's or connector's.
    response = client.post(f"/api/workflow/{path_id}/execute", json={"workflow": definition})
    assert response.status_code == 422 and response.mimetype == "application/problem+json", response.json
    assert response.json["code"] == "invalid_workflow"
    assert [e["field"] for e in response.json["errors"]] == [field]
    assert client.get("/api/v1/runs").json["items"] == []


def test_an_inline_definition_may_repeat_the_path_id(client):
    response = client.post("/api/workflow/adhoc/execute",
                           json={"workflow": {"id": "adhoc", "nodes": [{"id": "a", "type": "trigger"}]}})
    assert response.status_code == 202
    assert client.get(response.json["statusUrl"]).json["workflowId"] == "adhoc"


def test_a_cycle_is_named_in_the_problem(client):
    cyclic = {"nodes": [{"id": n, "type": "transform"} for n in "abc"],
              "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "a"}]}
    problem = client.post("/api/workflow/x/execute", json={"workflow": cyclic}).json
    assert problem["code"] == "invalid_workflow" and "cycle: a -> b -> c -> a" in problem["detail"]


@pytest.mark.parametrize("data, status, code", [
    (b"{not json", 400, "malformed_json"), (b"[1]", 400, "body_not_object")])
def test_malformed_bodies_are_400s(client, data, status, code):
    for path in ("/api/workflow/pipeline/execute", "/api/workflow/pipeline/execute-node"):
        response = client.post(path, data=data, content_type="application/json")
        assert response.status_code == status and response.json["code"] == code


def test_an_unknown_workflow_or_execution_is_a_404(client):
    missing = client.post("/api/workflow/nope/execute", json={})
    assert missing.status_code == 404 and missing.json["code"] == "workflow_not_found"
    assert client.get("/api/workflow/execution/nope").json["code"] == "execution_not_found"
    connector_run = client.post("/trigger", json={"connector_id": "numbers"}).json
    assert client.get(f"/api/workflow/execution/{connector_run['run_id']}").status_code == 404


def test_execute_node_answers_with_the_output_at_once(client):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "node-123", "nodeType": "transform",
        "node": {"id": "node-123", "type": "transform", "config": {"value": {"greeting": "Hola {{ inputs.name }}"}}},
        "inputData": {"name": "mundo"}})
    assert response.status_code == 200
    assert response.json == {"success": True, "nodeId": "node-123", "output": {"greeting": "Hola mundo"},
                             "error": None, "mode": "local", "durationSeconds": response.json["durationSeconds"]}
    llm = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "llm-1", "nodeType": "llm", "node": {"config": {"prompt": "Say hello", "model": "gpt-4"}},
        "inputData": {}}).json
    assert llm["success"] and llm["output"]["model"] == "gpt-4" and llm["output"]["provider"] == "offline"


def test_execute_node_reports_a_failing_node_without_an_error_status(client):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "t", "nodeType": "transform", "node": {"config": {"value": "{{ inputs.missing.deeper }}"}}})
    assert response.status_code == 200 and response.json["success"] is False
    assert response.json["error"]["code"] == "template_error" and "node 't'" in response.json["error"]["message"]


def test_execute_node_runs_a_connector_node_as_a_recorded_run(running_app):
    client = running_app.test_client()
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "load", "nodeType": "connector", "node": {"config": {"connector_id": "numbers"}}}).json
    assert response["success"] and response["output"]["rows"] == {"numbers": 10}
    assert client.get(f"/api/v1/runs/{response['output']['run_id']}").json["status"] == "completed"


@pytest.mark.parametrize("body, field", [
    ({"nodeType": "llm"}, "nodeId"),
    ({"nodeId": "a", "nodeType": "llm", "node": {"id": "b"}}, "node.id"),
    ({"nodeId": "a", "nodeType": "llm", "node": {"type": "http"}}, "node.type"),
    ({"nodeId": "a", "nodeType": "teleport"}, "nodeType"),
    ({"nodeId": "a", "nodeType": "delay", "node": {"config": {"seconds": "soon"}}}, "node.config.seconds"),
    ({"nodeId": "a", "nodeType": "delay", "node": {"config": {"seconds": 1}, "timeout": 3600}}, "node.timeout"),
    ({"nodeId": "a", "nodeType": "llm", "node": {"config": {}}}, "node.config.prompt"),
    ({"nodeId": "a", "nodeType": "llm", "node": {"config": {"prompt": "x"}, "retries": "many"}}, "node.retries"),
    ({"nodeId": "a", "nodeType": "llm", "inputData": "text"}, "inputData"),
])
def test_bad_execute_node_input_is_a_422_naming_the_field(client, body, field):
    response = client.post("/api/workflow/any/execute-node", json=body)
    assert response.status_code == 422, response.json
    assert field in [e["field"] for e in response.json["errors"]], response.json


def test_a_bad_workflow_file_stops_the_start_naming_file_node_and_field(app_config):
    bad = app_config["workflows_dir"] / "broken.yaml"
    bad.write_text("nodes:\n  - {id: start, type: trigger}\n  - {id: call, type: http, config: {method: GET}}\n"
                   "connections: [{from: start, to: call}]\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: nodes\[1\].config.url: node 'call': field required"):
        create_app(app_config)


def test_workflow_files_are_read_with_their_ids_and_errors(tmp_path: Path):
    (tmp_path / "one.yaml").write_text("nodes: [{id: a, type: trigger}]\n")
    (tmp_path / "two.yml").write_text("id: second\nnodes: [{id: a, type: output}]\n")
    registry = WorkflowRegistry.load(tmp_path)
    assert sorted(spec.id for spec in registry) == ["one", "second"]
    (tmp_path / "three.yaml").write_text("nodes: [{id: a, type: trigger}]\nconnections: [{from: a, to: zz}]\n")
    with pytest.raises(WorkflowError, match=r"three.yaml: connections\[0\].target: dangling connection: no node 'zz'"):
        WorkflowRegistry.load(tmp_path)
    assert len(WorkflowRegistry.load(tmp_path / "missing")) == 0


def test_secrets_in_a_workflow_come_from_the_environment_and_stay_out_of_run_records(app_config, monkeypatch):
    monkeypatch.setenv("PARTNER_TOKEN", "s3cr3t-partner-token")
    (app_config["workflows_dir"] / "partner.yaml").write_text(
        "nodes:\n  - id: call\n    type: http\n"
        "    config: {url: 'https://partner.example.com/x', headers: {Authorization: 'Bearer ${PARTNER_TOKEN}'}}\n")
    app = create_app(app_config)
    assert app.extensions["flowgate"].workflows.get("partner").node("call").config["headers"] == {
        "Authorization": "Bearer s3cr3t-partner-token"}
    client = app.test_client()
    accepted = client.post("/api/workflow/partner/execute", json={})
    for path in (f"/api/v1/runs/{accepted.json['executionId']}", "/api/v1/runs", accepted.json["statusUrl"]):
        assert "s3cr3t-partner-token" not in client.get(path).get_data(as_text=True), path
    run = client.get(f"/api/v1/runs/{accepted.json['executionId']}").json
    assert run["params"]["workflow"]["nodes"][0]["config"]["headers"] == {"Authorization": "***"}
    stored = app.extensions["flowgate"].store.get(accepted.json["executionId"])
    assert "s3cr3t" not in str(stored.params)  # the record keeps ${PARTNER_TOKEN}; the executor resolves it
    assert stored.params["workflow"]["nodes"][0]["config"]["headers"]["Authorization"] == "Bearer ${PARTNER_TOKEN}"
    app.extensions["flowgate"].store.dispose()


def test_a_file_workflows_variables_are_resolved_where_it_runs(app_config, monkeypatch):
    monkeypatch.setenv("GREETING", "hola")
    (app_config["workflows_dir"] / "greet.yaml").write_text(
        "nodes: [{id: say, type: output, config: {value: '${GREETING} {{ inputs.name }}'}}]\n")
    app = create_app(app_config)
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        accepted = client.post("/api/workflow/greet/execute", json={"inputs": {"name": "mundo"}}).json
        # Resolved here (not "${GREETING} mundo"), and, as every resolved ${VAR} is a secret, scrubbed where shown.
        assert wait_until_ended(client, accepted["statusUrl"])["outputs"] == {"say": "*** mundo"}
        inline = {"nodes": [{"id": "say", "type": "output", "config": {"value": "${GREETING}"}}]}
        leaked = client.post("/api/workflow/x/execute", json={"workflow": inline}).json
        assert wait_until_ended(client, leaked["statusUrl"])["outputs"] == {"say": "${GREETING}"}  # inline: no env
    finally:
        services.stop(timeout=5)
        services.store.dispose()


def test_a_workflow_file_naming_an_unset_variable_stops_the_start(app_config, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    (app_config["workflows_dir"] / "broken.yaml").write_text(
        "nodes: [{id: a, type: transform, config: {value: '${NOT_SET_ANYWHERE}'}}]\n")
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE is not set"):
        create_app(app_config)


def test_the_workflow_files_are_listed_with_graph_inputs_and_latest_runs(client):
    assert [(w["id"], w["nodes"], w["scheduled"]) for w in client.get("/api/v1/workflows").json["items"]] == [
        ("cached", 1, False), ("pipeline", 6, False), ("sleepy", 2, False), ("with_connector", 2, False)]
    execution = client.post("/api/workflow/pipeline/execute", json={"inputs": {"text": "yo"}}).json
    body = client.get("/api/v1/workflows/pipeline").json
    assert body["layers"] == [["start"], ["a", "b", "shout"], ["join"], ["out"]]
    assert body["graph"]["nodes"][0] == {"id": "start", "type": "trigger", "name": None}
    assert {"from": "start", "to": "shout", "branch": None} in body["graph"]["connections"]
    assert len(body["graph"]["connections"]) == 7
    assert body["inputs"] == {"text": "hi"}  # the trigger's defaults
    assert body["schedule"] is None
    assert [run["run_id"] for run in body["latest_runs"]] == [execution["executionId"]]
    # a name only a template reads is an input without a default
    assert client.get("/api/v1/workflows/with_connector").json["inputs"] == {"n": None}


def test_an_unknown_workflow_file_is_a_404_problem(client):
    missing = client.get("/api/v1/workflows/nope")
    assert missing.status_code == 404 and missing.json["code"] == "workflow_not_found"
