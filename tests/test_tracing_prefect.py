"""Traces on the Prefect path: a real gunicorn hands the run to a real Prefect server and process worker, and the
flow run continues the caller's trace (its spans reach the OTLP receiver, its JSON lines carry the trace id)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.prefect_stack import DEPLOYED, PrefectStack, fresh_postgres_database
from tests.support.trace_context import CALLER_SPAN, CALLER_TRACE, TRACEPARENT
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=120)
FLOW_RUN_SERVICE = "flowgate-flow-run"  # OTEL_SERVICE_NAME of the worker's flow runs


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver: OtlpReceiver) -> Iterator[PrefectStack]:
    """A Prefect server with the deployments, and a worker whose flow runs export to `receiver`, lines as JSON."""
    workdir = tmp_path_factory.mktemp("prefect-traces")
    (workdir / "connectors.yaml").write_text(DEPLOYED)
    stack = PrefectStack(workdir, database_url=fresh_postgres_database("flowgate_test_traces"))
    try:
        stack.start_server()
        stack.deploy()
        stack.env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100",
                          "OTEL_SERVICE_NAME": FLOW_RUN_SERVICE,
                          "PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER": "json"})
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def test_a_prefect_flow_run_continues_the_callers_trace(stack: PrefectStack, receiver: OtlpReceiver, tmp_path: Path):
    (tmp_path / "connectors.yaml").write_text(DEPLOYED)
    # The gateway's run store is the worker's: a flow run of a run its worker cannot find is not executed.
    gateway = GunicornServer(tmp_path, workers=1, PREFECT_API_URL=stack.api_url, FLOWGATE_PREFECT_POOL=stack.pool,
                             DATABASE_URL=stack.run_store_url,
                             OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100")
    try:
        gateway.start()
        answer = httpx.post(f"{gateway.url}/trigger", json={"connector_id": "numbers", "backend": "prefect",
                                                             "wait": 120}, headers={"traceparent": TRACEPARENT},
                            timeout=150)
        run = answer.json()
        assert run["status"] == "completed" and run["backend"] == "prefect", run
        assert run["trace_id"] == CALLER_TRACE
        flow_run = stack.api("GET", f"flow_runs/{run['prefect_flow_run_id']}")
        assert f"trace:{CALLER_TRACE}" in flow_run["tags"]

        def flow_run_spans() -> list:
            spans = receiver.trace(CALLER_TRACE)
            names = {span.name for span in spans if span.resource["service.name"] == FLOW_RUN_SERVICE}
            return spans if {"run", "extract", "normalize", "load"} <= names else []

        spans = wait_until(flow_run_spans, 60, "the flow run's spans")
        request = next(span for span in spans if span.name == "POST /trigger")
        assert request.parent_span_id == CALLER_SPAN
        dispatch = next(span for span in spans if span.name == "dispatch")
        assert dispatch.attributes["flowgate.backend"] == "prefect" and dispatch.parent_span_id == request.span_id
        assert flow_run["labels"]["__OTEL_TRACEPARENT"] == f"00-{CALLER_TRACE}-{dispatch.span_id}-01"
        in_flow_run = [span for span in spans if span.resource["service.name"] == FLOW_RUN_SERVICE]
        flow = next(span for span in in_flow_run if span.name == "run")
        assert flow.parent_span_id == dispatch.span_id and flow.attributes["flowgate.run_id"] == run["run_id"]
        assert flow.resource["process.pid"] != request.resource["process.pid"]
        load = next(span for span in in_flow_run if span.name == "load")
        assert load.attributes["flowgate.rows.numbers"] == 10
        lines = [json.loads(line) for line in (stack.workdir / "prefect-worker.log").read_text().splitlines()
                 if line.startswith("{")]
        of_run = [line for line in lines if line.get("run_id") == run["run_id"]]
        assert of_run and {line.get("trace_id") for line in of_run} == {CALLER_TRACE}
    finally:
        gateway.kill()
