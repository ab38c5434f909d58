"""The http node against a real local server (allow-list, redirects, retries) and the LLM providers."""
from __future__ import annotations

import threading

import pytest

from connectors.outbound import OutboundPolicy, OutboundRefused
from flows.engine import WorkflowEngine
from flows.llm import OfflineProvider, OpenAICompatibleProvider
from flows.nodes import Toolbox
from flows.workflow_spec import NodeSpec, WorkflowSpec
from tests.support.fake_services import EchoService, FakeOpenAI


@pytest.fixture
def echo():
    server = EchoService()
    yield server
    server.gate.set()
    server.stop()


@pytest.fixture
def openai():
    server = FakeOpenAI()
    yield server
    server.stop()


def http_engine(*allowed: str) -> WorkflowEngine:
    return WorkflowEngine(Toolbox(outbound=OutboundPolicy.parse(",".join(allowed))))


def test_the_http_node_calls_an_allowed_host_with_templated_url_query_and_body(echo):
    workflow = WorkflowSpec.model_validate({"id": "wf", "nodes": [
        {"id": "start", "type": "trigger"},
        {"id": "fetch", "type": "http", "config": {
            "method": "POST", "url": echo.url + "/items/{{ inputs.item }}", "params": {"q": "{{ inputs.q }}"},
            "headers": {"X-Trace": "t-{{ inputs.item }}"}, "body": {"n": "{{ inputs.item * 2 }}"}}},
        {"id": "use", "type": "output", "config": {"value": "{{ nodes.fetch.output.body.name }}"}}],
        "connections": [{"from": "start", "to": "fetch"}, {"from": "fetch", "to": "use"}]})
    result = http_engine(f"127.0.0.1:{echo.port}").run(workflow, {"item": 7, "q": "x"})
    assert result.status == "completed", result.nodes["fetch"].error
    body = result.nodes["fetch"].output["body"]
    assert result.nodes["fetch"].output["status"] == 200
    assert body == {"id": 7, "name": "item 7", "query": {"q": "x"}, "echo": {"n": 14}}
    assert echo.requests[-1]["headers"]["x-trace"] == "t-7"
    assert result.outputs == {"use": "item 7"}


@pytest.mark.parametrize("allowed", ["", "example.com", "127.0.0.1:1", "*.internal"])
def test_a_host_outside_the_allow_list_is_refused_without_a_request(echo, allowed):
    node = NodeSpec(id="h", type="http", config={"url": echo.url + "/items/1"}, retries=3)
    result = http_engine(allowed).run_node(node, {})
    assert result.status == "failed" and result.error["code"] == "outbound_refused"
    assert "not on the allow-list" in result.error["message"] and result.attempts == 1  # terminal: no retry
    assert echo.requests == []


def test_a_redirect_to_a_refused_host_is_refused_before_it_is_followed(echo):
    other = EchoService()
    try:
        url = f"{echo.url}/redirect?to={other.url}/items/2"
        refused = http_engine(f"127.0.0.1:{echo.port}").run_node(NodeSpec(id="h", type="http", config={"url": url}), {})
        assert refused.status == "failed" and refused.error["code"] == "outbound_refused"
        assert f"127.0.0.1:{other.port}" in refused.error["message"] and other.requests == []
        allowed = http_engine(f"127.0.0.1:{echo.port}", f"127.0.0.1:{other.port}").run_node(
            NodeSpec(id="h", type="http", config={"url": url}), {})
        assert allowed.status == "completed" and allowed.output["body"]["id"] == 2
    finally:
        other.stop()


def test_a_5xx_is_retried_and_a_4xx_is_not(echo):
    echo.failures = 2
    engine = http_engine(f"127.0.0.1:{echo.port}")
    flaky = engine.run(WorkflowSpec.model_validate({"id": "wf", "nodes": [
        {"id": "h", "type": "http", "retries": 3, "retry_backoff_seconds": 0.01, "config": {"url": echo.url + "/flaky"}}]}), {})
    assert flaky.nodes["h"].status == "completed" and flaky.nodes["h"].attempts == 3
    missing = engine.run(WorkflowSpec.model_validate({"id": "wf", "nodes": [
        {"id": "h", "type": "http", "retries": 3, "config": {"url": echo.url + "/nothing"}}]}), {})
    assert missing.nodes["h"].status == "failed" and missing.nodes["h"].attempts == 1
    assert missing.nodes["h"].error["code"] == "http_status"


def test_the_http_node_timeout_bounds_the_call(echo):
    """The server holds the request until the gate opens: the node ends on its own 0.3 s timeout while the gate is
    still shut (without the bound it would wait for the gate, opened after a minute as a backstop, and complete)."""
    backstop = threading.Timer(60, echo.gate.set)
    backstop.start()
    try:
        node = NodeSpec(id="h", type="http", timeout=0.3, config={"url": echo.url + "/gate"})
        result = http_engine(f"127.0.0.1:{echo.port}").run_node(node, {})
        shut = not echo.gate.is_set()
    finally:
        backstop.cancel()
    assert result.status == "failed" and result.error["code"] in ("timeout", "http_error"), result
    assert shut, "the node returned only once the gate opened: its timeout did not bound the call"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http:///nohost", "not a url"])
def test_only_http_urls_with_a_host_pass_the_policy(url):
    with pytest.raises(OutboundRefused):
        OutboundPolicy.parse("127.0.0.1,*").check(url)


def test_wildcards_match_subdomains_only():
    policy = OutboundPolicy.parse("*.example.com, api.other.org")
    assert policy.check("https://a.b.example.com/x").host == "a.b.example.com"
    assert policy.check("https://API.other.org").host == "api.other.org"
    for refused in ("https://example.com.evil.net/", "https://evilexample.com/", "https://other.org/"):
        with pytest.raises(OutboundRefused):
            policy.check(refused)


def test_the_openai_compatible_provider_sends_the_prompt_and_reads_the_answer(openai):
    provider = OpenAICompatibleProvider(openai.url + "/v1", "sk-test", "gpt-test")
    engine = WorkflowEngine(Toolbox(llm=provider))
    node = NodeSpec(id="l", type="llm", config={"prompt": "Translate {{ inputs.text }}", "system": "be brief",
                                                "temperature": 0.2, "max_tokens": 50})
    result = engine.run_node(node, {"text": "hello"})
    assert result.status == "completed", result.error
    assert result.output == {"response": "echo: Translate hello", "model": "gpt-test", "provider": "openai",
                             "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 9}}
    sent = openai.requests[-1]["body"]
    assert sent["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Translate hello"}]
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50


def test_a_rate_limited_llm_call_is_retried_and_a_bad_key_is_not(openai):
    openai.fail_next = 1
    node = {"id": "l", "type": "llm", "retries": 2, "retry_backoff_seconds": 0.01, "config": {"prompt": "hi"}}
    ok = WorkflowEngine(Toolbox(llm=OpenAICompatibleProvider(openai.url + "/v1", "sk-test", "m"))).run(
        WorkflowSpec.model_validate({"id": "wf", "nodes": [node]}), {})
    assert ok.nodes["l"].status == "completed" and ok.nodes["l"].attempts == 2
    bad = WorkflowEngine(Toolbox(llm=OpenAICompatibleProvider(openai.url + "/v1", "wrong", "m"))).run(
        WorkflowSpec.model_validate({"id": "wf", "nodes": [node]}), {})
    assert bad.nodes["l"].status == "failed" and bad.nodes["l"].attempts == 1
    assert "HTTP 401" in bad.nodes["l"].error["message"]


def test_the_offline_provider_is_deterministic_and_says_it_is_offline():
    provider = OfflineProvider()
    first = provider.complete("Say hello", system=None, model=None, temperature=None, max_tokens=None, timeout=1)
    again = provider.complete("Say hello", system=None, model=None, temperature=None, max_tokens=None, timeout=1)
    other = provider.complete("Say bye", system=None, model=None, temperature=None, max_tokens=None, timeout=1)
    assert first == again and first.response.startswith("[offline ") and first.response.endswith("Say hello")
    assert other.response != first.response and first.provider == "offline"
