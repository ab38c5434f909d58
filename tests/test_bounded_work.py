"""Bounded work (issue 16, items 4 and 9; issue 26, H1): templates stop at the node's timeout, a cancel and a size
cap, checked before a value is built; node outputs, run results and http-node response bodies are capped by
FLOWGATE_MAX_OUTPUT_BYTES."""
from __future__ import annotations

import threading
import time
import tracemalloc

import pytest

from connectors.outbound import OutboundPolicy
from flows.engine import WorkflowEngine
from flows.nodes import Toolbox
from flows.workflow_spec import WorkflowSpec
from tests.support.fake_services import EchoService

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
    # issue 26, H1: each of these built its whole value (up to 1.23 GB) before the size was checked
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '%*s' % (999999999, 'x') }}",
    "{{ '%*s'|format(999999999, 'x') }}",
    "{{ '{:{}}'.format('x', 999999999) }}",
    "{{ '%.999999999f' % 1.5 }}",
    "{{ '{:.999999999f}'.format(1.5) }}",
    "{{ '{x:>999999999}'.format_map({'x': 1}) }}",
    "{{ lipsum(n=100000)|length }}",
    # each operand within the limit (4096 here), the result 16 million characters
    "{{ ('\t' * 4000).expandtabs(4000) }}",
    "{{ ('x' * 4000).replace('x', 'y' * 4000) }}",
    "{{ ('x' * 4000)|replace('x', 'y' * 4000) }}",
    "{{ ('x' * 4000).translate({120: 'y' * 4000}) }}",
    "{{ ('\n' * 4000)|indent(4000) }}",
    "{{ ('x' * 4000)|wordwrap(1, wrapstring='y' * 4000) }}",
    "{{ (1).to_bytes(999999999, 'big') }}",
    # one string referenced many times is small in memory and huge as text, joined or written out
    "{% set s = 'x' * 4000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}",
    "{% set s = 'x' * 4000 %}" + "".join(f"{{% set {b} = [{a}, {a}, {a}, {a}, {a}, {a}, {a}, {a}, {a}, {a}] %}}"
                                          for a, b in zip("sabcd", "abcde")) + "{{ e }}",  # 400 MB as text
    "{% set s = 'x' * 4000 %}{{ [s, s, s, s, s, s, s, s, s, s]|join }}",
    "{% set s = 'x' * 4000 %}{{ ''.join([s, s, s, s, s, s, s, s, s, s]) }}",
    "{% set s = 'x' * 4000 %}{{ [s, s, s, s, s, s, s, s, s, s] ~ '' }}",
    "{% set s = 'x' * 4000 %}{{ [s, s, s, s, s, s, s, s, s, s]|tojson }}",
    "{% set s = 'x' * 4000 %}{{ '{!r}'.format([s, s, s, s, s, s, s, s, s, s]) }}",
    "{% set s = 'x' * 4000 %}{{ [s] * 4000 }}",
    "{% set a = [1] * 1000 %}{{ [a, a, a, a, a, a, a, a, a, a]|sum(start=[]) }}",
    # a block's output grows at loop speed, by reference, until it is joined
    "{% set b %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}{% endset %}{{ b }}",
])
def test_a_template_that_would_build_a_huge_value_fails_naming_the_limit(client, template: str):
    tracemalloc.start()  # the peak of what Python allocated during the request: what made the worker's RSS jump
    try:
        response = client.post("/api/workflow/any/execute-node", json={
            "nodeId": "t", "nodeType": "transform", "node": {"timeout": 1, "config": {"value": template}}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 200
    body = response.json
    assert body["success"] is False and body["error"]["code"] == "template_error"
    assert "limit:" in body["error"]["message"]
    assert len(response.get_data()) < 10_000
    assert peak < 10 * 2**20, f"{peak / 2**20:.0f} MB allocated: the value was built before it was refused"


def test_a_render_stuck_in_one_long_call_ends_at_the_node_timeout(monkeypatch):
    """A call the checks cannot interrupt (here a filter that sleeps) is abandoned at the node's deadline, as a
    node's own work is: rendering runs inside the node's time limit, not before it."""
    from flows.templates import _environment

    monkeypatch.setitem(_environment().filters, "sleep", lambda seconds: time.sleep(seconds) or seconds)
    result = run_in_thread(WorkflowEngine(Toolbox()), one_node({"type": "transform", "timeout": 1,
                                                                "config": {"value": "{{ 30|sleep }}"}}), deadline=20)
    node = result.nodes["n"]
    assert node.status == "failed" and node.error["code"] == "template_error"
    assert "longer than the node's timeout (1 s)" in node.error["message"]


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


def test_ordinary_formatting_joins_and_blocks_still_render():
    from flows.templates import render

    assert render("{{ '{:>6}|{:.2f}|{x:03d}'.format('ab', 3.14159, x=7) }}", {}) == "    ab|3.14|007"
    assert render("{{ '%-4s|%*d|%.1f'|format('a', 3, 5, 2.25) }} {{ '%(n)s!' % {'n': 'hi'} }}", {}) == \
        "a   |  5|2.2 hi!"
    assert render("{{ rows|join(',', attribute='id') }} {{ ', '.join(['a', 'b']) }} {{ 'a' ~ 1 ~ [2] }}",
                  {"rows": [{"id": 1}, {"id": 2}]}) == "1,2 a, b a1[2]"
    assert render("{% macro li(x) %}<{{ x }}>{% endmacro %}{% set items %}{% for i in range(3) %}{{ li(i) }}"
                  "{% endfor %}{% endset %}{{ items }} {{ [[1], [2]]|sum(start=[]) }}", {}) == "<0><1><2> [1, 2]"
    assert len(render("{{ lipsum(2, html=false) }}", {})) > 20
    assert render("{{ inputs }}", {"inputs": {"rows": [{"id": i} for i in range(1000)]}})["rows"][999] == {"id": 999}
