"""Traces: the W3C trace context a run carries through every process it touches, and OpenTelemetry spans
exported over OTLP/HTTP when an endpoint is configured.

Every process that does a run's work (a gateway worker after gunicorn forks, a connector's child process, a
Prefect flow run) calls `configure` once. With OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) set it
installs the SDK: a batch exporter over OTLP/HTTP, the sampler OTEL_TRACES_SAMPLER names, every other OTEL_*
variable read by the SDK itself. Without one nothing is installed and nothing costs: the API's no-op tracer
passes the current context through unchanged, so outbound calls still carry the caller's trace (its span as
their parent), and a trace flowgate starts itself is only a new trace id, recorded nowhere but in the run and
its log lines. A context crosses a process boundary as a carrier: {"traceparent": ..., "tracestate": ...}.

On the floor every other one imports (connectors/): no Flask here.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

Carrier = dict[str, str]
RUN_ID = "flowgate.run_id"  # on a run's own spans; a span with it may start a trace (_work_only)
_configured_pid: int | None = None


def tracer() -> trace.Tracer:
    """flowgate's tracer (the no-op one until `configure` installed the SDK)."""
    return trace.get_tracer("flowgate")


def exporting(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether spans are exported: an OTLP endpoint is set, the SDK is not disabled, the exporter not `none`."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(service: str = "flowgate") -> bool:
    """Install the SDK in this process when exporting (once per process: a forked child configures its own);
    True when spans are exported from here."""
    global _configured_pid
    if _configured_pid == os.getpid():
        return True
    if not exporting():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over `service` (Resource.create merges them in); the
    # pid tells a gateway worker's spans from its connector processes' and flow runs'.
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service,
                                "process.pid": os.getpid()})
    provider = TracerProvider(resource=resource, sampler=_work_only(_get_from_env_or_default()))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured_pid = os.getpid()
    return True


def flush(timeout_millis: int = 5000) -> None:
    """Send the spans this process has buffered (before it exits or is killed)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(timeout_millis)


def carrier(ctx: otel_context.Context | None = None) -> Carrier:
    """The context (the current one by default) as W3C headers: empty when there is no trace."""
    headers: Carrier = {}
    propagate.inject(headers, context=ctx)
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context W3C headers (or a stored carrier) name; None when they name none (absent or malformed: the
    propagator ignores a bad traceparent, and so does flowgate)."""
    if not headers:
        return None
    ctx = propagate.extract(headers)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def new_trace() -> otel_context.Context:
    """A context of a new trace with nothing recorded yet: where flowgate starts a trace without the SDK (with
    it, the request's server span is the root instead). Not sampled: no span of it is recorded anywhere."""
    span_context = SpanContext(trace_id=random.getrandbits(128) or 1, span_id=random.getrandbits(64) or 1,
                               is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    return trace.set_span_in_context(NonRecordingSpan(span_context))


def trace_id(ctx: otel_context.Context | None = None) -> str | None:
    """The trace id (32 hex digits) of `ctx` (the current context by default), or None."""
    span_context = trace.get_current_span(ctx).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id a carrier names, or None."""
    ctx = extract(headers)
    return trace_id(ctx) if ctx is not None else None


class TraceIdFilter(logging.Filter):
    """Puts `trace_id` on every record (None outside a trace) unless it came with one (a relayed line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id()
        return True


def _work_only(delegate: Any) -> Any:
    """The sampler: `delegate` (OTEL_TRACES_SAMPLER's), except that no trace starts at a background loop's SQL
    statement or HTTP call (claims, heartbeats and Prefect polls would each start one per poll). A trace starts at
    a request (a server span) or at a run's own span; everything under those is sampled as configured. (The
    SDK's import costs ~0.1 s: it is imported only when exporting.)"""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class WorkOnly(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: SpanKind | None = None,
                          attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid and kind != SpanKind.SERVER and not (attributes or {}).get(RUN_ID):
                return SamplingResult(Decision.DROP)
            return delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"WorkOnly{{{delegate.get_description()}}}"

    return WorkOnly()
