"""Traces: a run continues its caller's W3C trace in every process (gateway, connector child, callback), and with
an OTLP endpoint its spans reach a real receiver as one trace."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

from app.callback_sender import CallbackSender
from app.runs.store import NewRun
from connectors import tracing
from connectors.outbound import OutboundPolicy
from tests.support.fake_services import CallbackReceiver, EchoService
from tests.support.gunicorn_server import ROOT, GunicornServer
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.trace_context import CALLER_SPAN, CALLER_TRACE, TRACEPARENT
from tests.support.waiting import wait_until, wait_until_ended

SECRET = "callback-secret-for-tests"


def test_a_run_takes_the_trace_id_of_the_callers_traceparent(client):
    run = client.post("/trigger", json={"connector_id": "numbers"}, headers={"traceparent": TRACEPARENT}).json
    assert run["trace_id"] == CALLER_TRACE
    assert client.get(f"/api/v1/runs/{run['run_id']}").json["trace_id"] == CALLER_TRACE


@pytest.mark.parametrize("traceparent", [None, "00-nonsense", "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                                         f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01", "x" * 300])
def test_without_a_valid_traceparent_a_run_starts_a_trace_of_its_own(client, traceparent):
    headers = {"traceparent": traceparent} if traceparent else {}
    answer = client.post("/trigger", json={"connector_id": "numbers"}, headers=headers)
    assert answer.status_code == 202  # a malformed traceparent is ignored, never refused
    assert re.fullmatch(r"[0-9a-f]{32}", answer.json["trace_id"]) and answer.json["trace_id"] != CALLER_TRACE


def test_two_triggers_without_a_trace_get_two_traces(client):
    ids = {client.post("/trigger", json={"connector_id": "numbers"}).json["trace_id"] for _ in range(2)}
    assert len(ids) == 2


def test_the_callback_post_carries_the_runs_traceparent(app, workdir):
    receiver = CallbackReceiver()
    try:
        store = app.extensions["flowgate"].store
        run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                         concurrency_key="k", callback_url=f"{receiver.url}/hook",
                                         trace_context={"traceparent": TRACEPARENT}))
        store.cancel(run.id)  # ended: its callback is due
        sender = CallbackSender(store, OutboundPolicy.parse(f"127.0.0.1:{receiver.port}"), SECRET)
        sender.start()
        try:
            wait_until(lambda: receiver.raw, 30, "the callback")
        finally:
            sender.stop()
        headers = receiver.raw[0][0]
        assert headers["traceparent"].split("-")[1] == CALLER_TRACE  # without the SDK: the caller's span as parent
        assert headers["traceparent"] == TRACEPARENT
    finally:
        receiver.stop()


def test_an_http_node_sends_the_current_trace(workdir):
    echo = EchoService()
    try:
        from opentelemetry import context as otel_context

        token = otel_context.attach(tracing.extract({"traceparent": TRACEPARENT}))
        try:
            OutboundPolicy.parse(f"127.0.0.1:{echo.port}").request(httpx.Client(), "GET", f"{echo.url}/items/1",
                                                                   headers={"X-Own": "1"})
        finally:
            otel_context.detach(token)
        assert echo.requests[0]["headers"]["traceparent"] == TRACEPARENT
        assert echo.requests[0]["headers"]["x-own"] == "1"
    finally:
        echo.stop()


def test_a_local_runs_log_lines_carry_its_trace_id_from_the_gateway_and_the_connector_process(running_app, caplog):
    client = running_app.test_client()
    with caplog.at_level("INFO"):
        run = client.post("/trigger", json={"connector_id": "numbers"}, headers={"traceparent": TRACEPARENT}).json
        assert wait_until_ended(client, f"/api/v1/runs/{run['run_id']}")["status"] == "completed"
    lines = [record for record in caplog.records if getattr(record, "run_id", None) == run["run_id"]]
    assert any(record.message.startswith("connector numbers runs in process") for record in lines)  # relayed
    assert lines and {tracing.TraceIdFilter().filter(record) and record.trace_id for record in lines} == {CALLER_TRACE}


# --- a real gunicorn, a real receiver, a JDK client -------------------------------------------------------------


@pytest.fixture(scope="module")
def java_trigger(tmp_path_factory) -> list[str]:
    """The command that runs tests/support/TracedTrigger.java, compiled here with javac."""
    if not (shutil.which("javac") and shutil.which("java")):
        pytest.skip("javac/java not found: the JDK client test needs a JDK 11 or later")
    classes = tmp_path_factory.mktemp("java")
    subprocess.run(["javac", "-d", str(classes), str(ROOT / "tests" / "support" / "TracedTrigger.java")], check=True, timeout=120)
    return ["java", "-cp", str(classes), "TracedTrigger"]


@pytest.mark.long(seconds=40)
def test_one_trace_from_a_jdk_caller_through_the_gateway_the_connector_process_and_the_callback(workdir, java_trigger):
    receiver, callbacks = OtlpReceiver(), CallbackReceiver()
    server = GunicornServer(workdir, workers=1, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100",
                            OTEL_SERVICE_NAME="flowgate-test", FLOWGATE_CALLBACK_SECRET=SECRET,
                            FLOWGATE_CALLBACK_ALLOWED_HOSTS=f"127.0.0.1:{callbacks.port}")
    try:
        server.start()
        body = json.dumps({"connector_id": "numbers", "callback_url": f"{callbacks.url}/hook"})
        done = subprocess.run([*java_trigger, server.url, TRACEPARENT, body], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == "status=202", done.stdout
        run = json.loads(done.stdout.split("\n", 1)[1])
        assert run["trace_id"] == CALLER_TRACE
        wait_until(lambda: callbacks.raw, 60, "the callback")

        def whole_trace() -> list:
            spans = receiver.trace(CALLER_TRACE)
            names = {span.name for span in spans}
            return spans if {"POST /trigger", "dispatch", "run", "extract", "normalize", "load", "callback",
                             "POST"} <= names else []

        try:
            spans = wait_until(whole_trace, 60, "every span of the trace")
        except AssertionError:
            raise AssertionError(f"spans seen: {sorted({span.name for span in receiver.trace(CALLER_TRACE)})}") from None
        by_name = {span.name: span for span in spans}
        request = by_name["POST /trigger"]
        assert request.parent_span_id == CALLER_SPAN and request.kind == 2  # SERVER, under the caller's span
        assert request.attributes["http.route"] == "/trigger"
        dispatch = by_name["dispatch"]
        assert dispatch.parent_span_id == request.span_id
        assert dispatch.attributes["flowgate.backend"] == "local"
        assert dispatch.attributes["flowgate.fallback_reason"] == "prefect_not_configured"
        assert dispatch.attributes["flowgate.run_id"] == run["run_id"]
        assert any(span.attributes.get("db.system") == "sqlite" and span.parent_span_id == dispatch.span_id
                   for span in spans)  # the run's insert, from the SQLAlchemy instrumentation
        run_span = by_name["run"]
        assert run_span.parent_span_id == dispatch.span_id and run_span.attributes["flowgate.status"] == "completed"
        gateway_pid = request.resource["process.pid"]
        assert run_span.resource["process.pid"] == gateway_pid
        steps = [by_name[step] for step in ("extract", "normalize", "load")]
        assert {step.parent_span_id for step in steps} == {run_span.span_id}
        assert {step.resource["process.pid"] for step in steps} != {gateway_pid}  # the connector's own process
        assert by_name["load"].attributes["flowgate.rows.numbers"] == 10
        callback = by_name["callback"]
        assert callback.parent_span_id == dispatch.span_id and callback.attributes["flowgate.callback.delivered"]
        post = next(span for span in spans if span.name == "POST" and span.parent_span_id == callback.span_id)
        headers = callbacks.raw[0][0]
        assert headers["traceparent"] == f"00-{CALLER_TRACE}-{post.span_id}-01"  # the receiver's trace continues
        assert all(span.resource["service.name"] == "flowgate-test" for span in spans)
        logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        of_run = [line for line in logged if line.get("run_id") == run["run_id"]]
        assert any(line["message"].startswith("connector numbers runs in process") for line in of_run)
        assert of_run and {line.get("trace_id") for line in of_run} == {CALLER_TRACE}
    finally:
        server.kill()
        receiver.stop()
        callbacks.stop()


def test_without_an_endpoint_nothing_is_configured_or_exported(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.exporting() and not tracing.configure()
    assert not tracing.exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.exporting({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.exporting({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"})
