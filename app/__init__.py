"""flowgate: the HTTP gateway that triggers connector pipelines and tracks their runs."""
from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, replace
from datetime import date
from decimal import Decimal
from typing import Any

from flask import Flask, current_app
from flask.json.provider import DefaultJSONProvider

from app.backends.executor import LocalExecutor
from app.backends.local import LocalBackend
from app.backends.prefect import PrefectBackend, make_prefect_route
from app.backends.prefect_sync import PrefectSync
from app.callback_sender import CallbackSender
from app.config import ConfigError, Settings, load_settings
from app.dispatch import Dispatcher
from app.pruner import Pruner
from app.run_log_capture import RunLogCapture
from app.runs.store import RunStore
from app.scheduler import Schedule, Scheduler, declared_schedules
from connectors import secrets
from connectors.outbound import OutboundPolicy, OutboundRefused
from connectors.pipeline import Workspace
from connectors.registry import ConnectorRegistry, RegistryError
from connectors.tracing import exporting
from connectors.tracing import flush as flush_spans
from flows.engine import WorkflowEngine
from flows.loop import Loop
from flows.nodes import make_toolbox
from flows.workflow_registry import WorkflowError, WorkflowRegistry

__version__ = "0.1.0"


@dataclass(frozen=True)
class Services:
    """The objects a gateway process is made of, created once per process by create_app."""

    settings: Settings
    registry: ConnectorRegistry
    workflows: WorkflowRegistry
    store: RunStore
    executor: LocalExecutor
    dispatcher: Dispatcher
    engine: WorkflowEngine  # for execute-node: one node inside the request, no cache
    workspace: Workspace  # where pipelines keep their state and DuckDB files
    prefect_sync: PrefectSync  # follows unfinished Prefect runs
    callbacks: CallbackSender
    pruner: Pruner  # deletes ended runs past FLOWGATE_RETENTION_DAYS
    run_logs: RunLogCapture  # keeps the lines a run logs in the store
    scheduler: Scheduler  # fires the connectors' and workflows' schedules

    @property
    def loops(self) -> tuple[Loop, ...]:
        """Every background loop of a gateway process (readiness reports each by name)."""
        return self.prefect_sync, self.callbacks, self.pruner, self.run_logs, self.scheduler

    def start(self) -> None:
        """Start this process's work (after gunicorn forks): traces, every loop, then the executor."""
        from app import gateway_tracing

        gateway_tracing.instrument([self.store.engine])
        for loop in self.loops:
            loop.start()
        self.executor.start()

    def stop(self, timeout: float) -> list[str]:
        """Let the executor's runs finish within `timeout` (the rest are recorded), then stop every loop; returns
        the ids of the runs that could not finish."""
        unfinished = self.executor.shutdown(timeout)
        for loop in self.loops:
            loop.stop()
        flush_spans()  # the spans of the runs and callbacks that ended last
        return unfinished


def services() -> Services:
    """The current app's services."""
    return current_app.extensions["flowgate"]


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON with ISO 8601 dates (not RFC 822) and exact decimals, as data rows need; a NaN or an infinity
    (a data row's float) is written as null: Python writes `NaN`, which is not JSON, and a strict parser (Jackson,
    JSON.parse) refuses the whole answer."""

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, date):
            return o.isoformat()
        if isinstance(o, Decimal):
            return str(o)
        return DefaultJSONProvider.default(o)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        try:
            return super().dumps(obj, allow_nan=False, **kwargs)
        except ValueError:  # a float out of JSON's range somewhere: the rare answer pays for a second pass
            return super().dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float in it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def check_declared_callbacks(schedules: list[Schedule], policy: OutboundPolicy, settings: Settings) -> None:
    """A scheduled run's `callback_url` (from the YAML) must be one a trigger could give: stop the start if not."""
    for schedule in schedules:
        if schedule.callback_url is None:
            continue
        where = (f"{settings.connectors_file}: connector '{schedule.target}'" if schedule.kind == "connector"
                 else f"{settings.workflows_dir}: workflow '{schedule.target}'")
        if not settings.callback_secret:
            raise ConfigError(f"{where}: field 'callback_url': callbacks are off (FLOWGATE_CALLBACK_SECRET is not set)")
        try:
            policy.check(schedule.callback_url)
        except OutboundRefused as exc:
            raise ConfigError(f"{where}: field 'callback_url': {exc} (FLOWGATE_CALLBACK_ALLOWED_HOSTS)") from None


def create_app(config: Settings | dict[str, Any] | None = None) -> Flask:
    """Build the gateway: settings, connectors, workflows, run store, executor (not started), blueprints."""
    settings = config if isinstance(config, Settings) else load_settings(config)
    for value in settings.secret_values():
        secrets.remember(value)
    from app import logs

    logs.configure()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call is noise

    app = Flask(__name__)
    # `//` in a path is not redirected: Werkzeug's redirect would name the request's Host in an absolute Location.
    app.url_map.merge_slashes = False
    if settings.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # Only the entries the trusted proxies added: anything further left the client wrote itself.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]  # Flask's documented way to wrap its WSGI app
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)
    app.json = JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False

    from app.auth import KeyRing

    keyring = KeyRing.parse(settings.api_keys, settings.api_keys_file)
    try:
        registry = ConnectorRegistry.load(settings.connectors_file)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    try:
        workflows = WorkflowRegistry.load(settings.workflows_dir, connector_ids=[spec.id for spec in registry])
    except WorkflowError as exc:
        raise ConfigError(str(exc)) from None
    store = RunStore(settings.run_store_url)
    store.create_schema()  # pending migrations, under a lock: replicas may start together
    workspace = settings.workspace
    toolbox = make_toolbox(settings)
    run_logs = RunLogCapture(store)
    executor = LocalExecutor(store, registry, workspace, slots=settings.executor_threads,
                             lease_seconds=settings.lease_seconds, poll_seconds=settings.poll_seconds, toolbox=toolbox,
                             run_timeout_seconds=settings.run_timeout_seconds, log_sink=run_logs,
                             reserved_slots=settings.reserved_slots, schedule_slots=settings.schedule_slots)
    prefect = PrefectBackend(store, make_prefect_route(settings), settings.run_timeout_seconds)
    dispatcher = Dispatcher(settings, store, registry, workspace, LocalBackend(store, executor), prefect, workflows)
    prefect_sync = PrefectSync(prefect, pickup_seconds=settings.prefect_pickup_seconds,
                               adopt=dispatcher.adopt_flow_run, start_seconds=settings.prefect_start_seconds)
    engine = WorkflowEngine(replace(toolbox, run_connector=executor.connector_runner(
        owner=f"execute-node:{socket.gethostname()}:{os.getpid()}")))
    callbacks = CallbackSender(store, OutboundPolicy.parse(settings.callback_allowed_hosts), settings.callback_secret,
                               max_attempts=settings.callback_max_attempts,
                               backoff_seconds=settings.callback_backoff_seconds, poll_seconds=settings.poll_seconds,
                               project=settings.project_dir)
    pruner = Pruner(store, settings.retention_days, settings.retention_interval_seconds, settings.retention_batch_size)
    schedules = declared_schedules(registry, workflows)
    check_declared_callbacks(schedules, callbacks.policy, settings)
    scheduler = Scheduler(schedules, store, dispatcher, settings.schedule_grace_seconds)
    app.extensions["flowgate"] = Services(settings, registry, workflows, store, executor, dispatcher, engine, workspace,
                                          prefect_sync, callbacks, pruner, run_logs, scheduler)

    from app import api, auth, errors, gateway_tracing, limits, metrics, openapi, polls, same_origin, waits

    errors.init_app(app)
    logs.init_app(app)  # before auth: a refused request still gets its id
    gateway_tracing.init_app(app, exporting())  # before auth too: a refused request is in the caller's trace
    same_origin.init_app(app, keyring.enabled, settings.server_name_list)  # keyless: no DNS rebinding, no CSRF
    auth.init_app(app, keyring, settings.auth_failure_limit, settings.rate_limit_storage)
    limits.init_app(app, settings.rate_limit, settings.rate_limit_storage)
    metrics.init_app(app)
    waits.init_app(app, settings.max_concurrent_waits, settings.max_concurrent_inline)
    polls.init_app(app)
    api.init_app(app)
    openapi.init_app(app, api_keys=keyring.enabled)
    return app
