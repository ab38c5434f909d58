"""A flow run continues its run's trace: the context comes in Prefect's traceparent label on the flow run (the
gateway set it when it created the flow run), the flow's span and its steps' spans go to this process's own
exporter (connectors/tracing.py), and the process's log records carry the trace id and run id (shown by
Prefect's JSON console format, PREFECT_LOGGING_HANDLERS_CONSOLE_FORMATTER=json)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span
from prefect.context import FlowRunContext

from connectors import tracing
from flows.prefect.contract import TRACEPARENT_LABEL, tagged_run_id


class _RunFilter(tracing.TraceIdFilter):
    """The run id and trace id on every record this process's handlers write."""

    def __init__(self, run_id: str | None):
        super().__init__()
        self.run_id = run_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is None:
            record.run_id = self.run_id
        return super().filter(record)


@contextmanager
def run_span(kind: str, target: str) -> Iterator[Span]:
    """The flow run's span, in its run's trace, current while the flow runs; flushed before the process ends."""
    exporting = tracing.configure()
    context = FlowRunContext.get()
    flow_run = context.flow_run if context is not None else None
    labels = (flow_run.labels if flow_run is not None else None) or {}
    run_id = tagged_run_id(list(flow_run.tags) if flow_run is not None else [])
    traceparent = labels.get(TRACEPARENT_LABEL)
    parent = tracing.extract({"traceparent": str(traceparent)}) if traceparent else None
    attributes = {tracing.RUN_ID: run_id or f"prefect:{flow_run.id if flow_run else ''}", "flowgate.kind": kind,
                  "flowgate.target": target, "flowgate.backend": "prefect",
                  "prefect.flow_run_id": str(flow_run.id) if flow_run is not None else ""}
    handlers = logging.getLogger().handlers
    records = _RunFilter(run_id)
    for handler in handlers:
        handler.addFilter(records)
    try:
        with tracing.tracer().start_as_current_span("run", context=parent, attributes=attributes) as span:
            yield span
    finally:
        for handler in handlers:
            handler.removeFilter(records)
        if exporting:
            tracing.flush()
