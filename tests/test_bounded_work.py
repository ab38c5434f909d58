"""Bounded work (issue 16, items 4 and 9): templates stop at the node's timeout, a cancel and a size cap;
node outputs, run results and http-node response bodies are capped by FLOWGATE_MAX_OUTPUT_BYTES."""
from __future__ import annotations

import threading

import pytest

from flows.engine import WorkflowEngine
from flows.nodes import Toolbox
from flows.outbound import OutboundPolicy
from flows.workflow_spec import WorkflowSpec
from tests.fake_services import EchoService

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}done"


def one_node(node: dict) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"id": "wf", "nodes": [{"id": "n", **node}]})


def run_in_thread(engine: WorkflowEngine, spec: WorkflowSpec, should_stop=lambda: False, deadline: float = 60):
    """The workflow's result, or a failure when it has not ended within `deadline` seconds (a runaway render)."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(engine.run(spec, {}, should_stop=should_stop)),
                              daemon=True)
    thread.start()
    thread.join(deadline)
    assert results, f"the workflow was still running after {deadline} s"
    return results[0]


def test_nested_template_loops_stop_at_the_node_timeout():
    result = run_in_thread(WorkflowEngine(Toolbox()),
                           one_node({"type": "transform", "timeout": 1, "config": {"value": NESTED_LOOPS}}))
    node = result.nodes["n"]
    assert node.status == "failed" and node.error["code"] == "template_error"
    assert "longer than the node's timeout (1 s)" in node.error["message"]


def test_a_cancel_stops_a_rendering_template():
    started = threading.Event()
    result = run_in_thread(WorkflowEngine(Toolbox()),
                           one_node({"type": "transform", "timeout": 3600, "config": {"value": NESTED_LOOPS}}),
                           should_stop=lambda: started.is_set() or started.set())
    assert result.status == "cancelled"


@pytest.mark.parametrize("template", [
    '{{ "x" * 300000000 }}',
    '{{ ["x"] * 300000000 }}',
    "{{ 'x'|center(300000000) }}",
    "{{ 'x'.ljust(300000000) }}",
    "{{ '%300000000s' % 1 }}",
    "{{ 7 ** 100000000 }}",
    "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
    "{% set s = 'x' * 1000000 %}{{ s ~ s }}",
])
def test_a_template_that_would_build_a_huge_value_fails_naming_the_limit(client, template: str):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "t", "nodeType": "transform", "node": {"config": {"value": template}}})
    assert response.status_code == 200
    body = response.json
    assert body["success"] is False and body["error"]["code"] == "template_error"
    assert "limit" in body["error"]["message"]
    assert len(response.get_data()) < 10_000


@pytest.fixture
def app_config(app_config: dict) -> dict:
    return {**app_config, "max_output_bytes": 4096}


def test_a_node_output_past_the_limit_fails_the_node(client):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "o", "nodeType": "output", "node": {}, "inputData": {"blob": "y" * 5000}})
    body = response.json
    assert body["success"] is False and body["error"]["code"] == "output_too_large"
    assert "FLOWGATE_MAX_OUTPUT_BYTES" in body["error"]["message"] and "4096" in body["error"]["message"]


def test_a_workflows_outputs_together_past_the_limit_fail_the_run():
    spec = WorkflowSpec.model_validate({"id": "wf", "nodes": [
        {"id": f"out{i}", "type": "output", "config": {"value": "z" * 1500}} for i in range(4)]})
    result = WorkflowEngine(Toolbox(max_output_bytes=4096)).run(spec, {})
    assert result.status == "failed"
    assert [n.status for n in result.nodes.values()] == ["completed", "completed", "failed", "failed"]
    assert result.nodes["out2"].error["code"] == "result_too_large"
    assert sum(len(v) for v in result.outputs.values()) <= 4096


@pytest.fixture
def echo():
    service = EchoService()
    yield service
    service.stop()


def test_an_http_nodes_response_body_is_capped_while_it_streams(echo):
    toolbox = Toolbox(outbound=OutboundPolicy.parse(f"127.0.0.1:{echo.port}"), max_output_bytes=100_000)
    big = one_node({"type": "http", "config": {"url": f"{echo.url}/big?n=5000000"}})
    node = WorkflowEngine(toolbox).run(big, {}).nodes["n"]
    assert node.status == "failed" and node.error["code"] == "response_too_large"
    assert "100000" in node.error["message"] and "FLOWGATE_MAX_OUTPUT_BYTES" in node.error["message"]
    small = one_node({"type": "http", "config": {"url": f"{echo.url}/big?n=1000"}})
    node = WorkflowEngine(toolbox).run(small, {}).nodes["n"]
    assert node.status == "completed" and node.output["body"] == "x" * 1000


def test_ordinary_templates_with_big_numbers_still_render():
    from flows.templates import render

    assert render("{{ inputs.id | default(1234567890) }}", {"inputs": {}}) == 1234567890
    assert render("{{ 2 ** 64 }} {{ 'ab' * 3 }} {{ '%05d' % 42 }}", {}) == "18446744073709551616 ababab 00042"
