"""Traces in the gateway: every request continues the caller's W3C trace (`traceparent`, `tracestate`) or starts
one, and with an OTLP endpoint configured its spans are exported (the set-up and the rules: connectors/tracing.py).

The request's span comes from OpenTelemetry's WSGI middleware around the Flask app, named after the route as
its Flask instrumentation would (that package's newest release needs an older opentelemetry-api than Prefect's:
requirements.txt); outbound calls and SQL statements from the httpx and SQLAlchemy instrumentations.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g, request
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from app.runs.models import Run
from connectors import tracing


def init_app(app: Flask, exporting: bool) -> None:
    """Put every request in a trace: the middleware's server span when `exporting`, else the caller's context
    (or a new trace) made current for the request. A malformed traceparent is ignored, never refused."""
    if exporting:
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app)  # type: ignore[method-assign]

    @app.before_request
    def continue_trace() -> None:
        span = trace.get_current_span()
        if span.get_span_context().is_valid:  # the middleware's server span
            if span.is_recording() and request.url_rule is not None:
                span.update_name(f"{request.method} {request.url_rule.rule}")
                span.set_attribute("http.route", request.url_rule.rule)
            return
        headers: dict[str, str] = {}  # Headers is no Mapping to the propagator's types; the first of a name wins
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        g.trace_token = otel_context.attach(tracing.extract(headers) or tracing.new_trace())

    @app.teardown_request
    def leave_trace(_exc: BaseException | None) -> None:
        token = g.pop("trace_token", None)
        if token is not None:
            otel_context.detach(token)


def instrument(engines: list) -> bool:
    """In a gateway process after gunicorn forks: the SDK, and spans of outbound HTTP calls and of SQL on
    `engines`, when exporting. True when spans are exported from this process."""
    if not tracing.configure("flowgate"):
        return False
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    if not HTTPXClientInstrumentor().is_instrumented_by_opentelemetry:
        HTTPXClientInstrumentor().instrument()
        SQLAlchemyInstrumentor().instrument(engines=engines)
    return True


@contextmanager
def run_span(run: Run) -> Iterator[Span]:
    """The span of a run's execution in this process, current while it runs, in the run's trace (a run stored
    before traces has none); with the run id, it may start a trace of its own."""
    attributes = {tracing.RUN_ID: run.id, "flowgate.kind": run.kind, "flowgate.target": run.target,
                  "flowgate.backend": run.backend}
    with tracing.tracer().start_as_current_span("run", context=tracing.extract(run.trace_context),
                                                attributes=attributes) as span:
        yield span


def run_span_ended(span: Span, status: str, error: str | None) -> None:
    """The run's end on its span: its status, and an error status for any end but completed."""
    span.set_attribute("flowgate.status", status)
    if status != "completed":
        span.set_status(StatusCode.ERROR, error or status)
