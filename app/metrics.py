"""Prometheus metrics, correct across gunicorn workers (prometheus_client's multiprocess mode).

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh folder before any worker starts; every worker then
writes its samples there and GET /metrics sums them. Without it (tests, a single process) the metrics live
in this process. Queue depth and executor slots are read from the run store at scrape time, so they are
the same whichever worker answers.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

TRIGGERS = Counter("flowgate_triggers_total", "Triggers answered, by kind, backend and outcome",
                   ["kind", "backend", "outcome"])
FALLBACKS = Counter("flowgate_fallbacks_total", "Runs that went local although Prefect was configured, by reason",
                    ["reason"])
RUN_DURATION = Histogram("flowgate_run_duration_seconds", "Run durations from start to end, by target and status",
                         ["kind", "target", "status"],
                         buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf")))
HTTP_LATENCY = Histogram("flowgate_http_request_duration_seconds", "HTTP latency by endpoint, method and status",
                         ["endpoint", "method", "status"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf")))
# Not counted: a run recovered as crashed after its process died (the lease's end, or gunicorn's child_exit).
RUNS = Counter("flowgate_runs_total", "Runs ended, by kind, backend and status", ["kind", "backend", "status"])
CALLBACKS = Counter("flowgate_callbacks_total", "Callback delivery attempts, by outcome: delivered, retrying "
                    "(failed, another attempt follows) or failed (the last attempt failed, or the host is refused)",
                    ["outcome"])
PREFECT_PROBE = Gauge("flowgate_prefect_probe_latency_seconds", "Latency of the last Prefect health probe",
                      multiprocess_mode="livemostrecent")
PREFECT_CIRCUIT = Gauge("flowgate_prefect_circuit_open", "1 while a worker's circuit to Prefect is open",
                        multiprocess_mode="livemax")
SCHEDULE_LAG = Histogram("flowgate_schedule_fire_lag_seconds",
                         "Scheduled runs: from the slot's time to the run's start (either path)", ["kind", "target"],
                         buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, float("inf")))
SCHEDULE_MISSED = Counter("flowgate_schedule_missed_slots_total",
                          "Slots that passed while no gateway ran them and catch_up did not run", ["kind", "target"])
SCHEDULE_SKIPPED = Counter("flowgate_schedule_skipped_slots_total",
                           "Slots that came while a run of the schedule was already waiting", ["kind", "target"])
SCHEMA_CHANGES = Counter("flowgate_schema_changes_total", "Schema changes completed connector runs made, by target "
                         "and kind (new_table, new_column, variant_column, type_change)", ["target", "kind"])
ALL = (TRIGGERS, FALLBACKS, RUN_DURATION, RUNS, CALLBACKS, HTTP_LATENCY, PREFECT_PROBE, PREFECT_CIRCUIT, SCHEDULE_LAG,
       SCHEDULE_MISSED, SCHEDULE_SKIPPED, SCHEMA_CHANGES)
# A run result's schema_changes entry (connectors/report.py) -> the `kind` label of each item it lists
_CHANGE_KINDS = {"new_columns": "new_column", "variant_columns": "variant_column", "type_changes": "type_change"}


class StoreCollector(Collector):
    """Queue depth and executor capacity, read from the run store when scraped (shared by every process)."""

    def __init__(self, store: Any, stale_after_seconds: float):
        self.store = store
        self.stale_after_seconds = stale_after_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.store.count_by_status()
        capacity = self.store.executors.capacity(self.stale_after_seconds)
        yield GaugeMetricFamily("flowgate_executor_queued_runs", "Local runs waiting for an executor slot",
                                value=counts.get("queued", 0))
        yield GaugeMetricFamily("flowgate_executor_busy_slots", "Executor slots running a run, all processes",
                                value=capacity.busy)
        yield GaugeMetricFamily("flowgate_executor_slots", "Executor slots of live executors, all processes",
                                value=capacity.slots)
        yield GaugeMetricFamily("flowgate_executors", "Executors with a recent heartbeat", value=capacity.executors)


# Label values must come from bounded sets: configured connectors and workflows keep their names, anything
# else (an inline workflow's caller-chosen id) is counted as `inline`.
_configured_targets: set[str] = set()
INLINE = "inline"
# HTTP methods are a token the client chooses (`ZZWORG /health` reaches the app, no key needed): the ones flowgate
# serves keep their name, any other is `other`. Paths no route matches are already one label, `(unmatched)`.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD, UNMATCHED = "other", "(unmatched)"


def configure_targets(names: Any) -> None:
    """The connector and workflow ids that may appear as a `target` label (from the configuration)."""
    _configured_targets.update(names)


def target_label(target: str) -> str:
    """`target` when it is configured, else `inline`: a caller must not be able to add series at will."""
    return target if target in _configured_targets else INLINE


def method_label(method: str) -> str:
    """`method` when it is a standard one flowgate could serve, else `other`."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


def observe_run_end(kind: str, target: str, status: str, started_at: Any, finished_at: Any,
                    result: dict[str, Any] | None = None, backend: str = "local") -> None:
    """Count a run's end and record its duration (either path), and the schema changes its result lists."""
    RUNS.labels(kind, backend, status).inc()
    if started_at and finished_at:
        RUN_DURATION.labels(kind, target_label(target), status).observe(
            max((finished_at - started_at).total_seconds(), 0.0))
    if kind == "connector" and result:
        for changes in (result.get("schema_changes") or {}).values():
            if changes.get("new_table"):
                SCHEMA_CHANGES.labels(target_label(target), "new_table").inc()
            for entry, label in _CHANGE_KINDS.items():
                if changes.get(entry):
                    SCHEMA_CHANGES.labels(target_label(target), label).inc(len(changes[entry]))


def observe_run_start(run: Any) -> None:
    """Record a scheduled run's fire lag when it starts (either path)."""
    if getattr(run, "scheduled_for", None) and run.started_at:
        SCHEDULE_LAG.labels(run.kind, target_label(run.target)).observe(
            max((run.started_at - run.scheduled_for).total_seconds(), 0.0))


def exposition(store: Any, stale_after_seconds: float) -> bytes:
    """Every metric in Prometheus' text format."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        for metric in ALL:
            registry.register(metric)
    registry.register(StoreCollector(store, stale_after_seconds))
    return generate_latest(registry)


def init_app(app: Flask) -> None:
    """Time every request; serve GET /metrics."""
    services = app.extensions["flowgate"]
    configure_targets([spec.id for spec in services.registry] + [spec.id for spec in services.workflows])

    @app.before_request
    def start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        started = g.pop("metrics_started", None)
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else UNMATCHED
            HTTP_LATENCY.labels(endpoint, method_label(request.method), str(response.status_code)).observe(
                time.perf_counter() - started)
        return response

    def metrics() -> Response:
        body = exposition(services.store, services.settings.lease_seconds)
        return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0], content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
