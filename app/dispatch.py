"""Dispatcher: turns an accepted trigger into a stored run and decides where it runs."""
from __future__ import annotations

import time
from typing import Any

from app.config import Settings
from app.errors import Conflict, NotFound, Unavailable, ValidationFailed
from app.runs.executor import LocalExecutor
from app.runs.models import Run
from app.runs.store import IdempotencyConflict, NewRun, RunStore
from connectors.pipeline import Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError

PREFECT_UNAVAILABLE = "prefect_not_configured"


class Dispatcher:
    """The one place that knows how a trigger becomes a run; views only call it."""

    def __init__(self, settings: Settings, store: RunStore, registry: ConnectorRegistry,
                 executor: LocalExecutor, workspace: Workspace):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.executor = executor
        self.workspace = workspace

    def trigger_connector(self, connector_id: str, params: dict[str, Any], backend: str | None = None,
                          idempotency_key: str | None = None) -> tuple[Run, bool]:
        """Validate, store and dispatch a connector run; returns the run and whether it is new."""
        spec = self.registry.get(connector_id)
        if spec is None:
            raise NotFound(f"no connector '{connector_id}'", code="connector_not_found")
        try:
            spec.with_params(params)
        except ParamsError as exc:
            raise ValidationFailed(exc.message, errors=[{"field": exc.field, "message": exc.message}]) from None
        chosen, reason = self.choose_backend(backend)
        new = NewRun(kind="connector", target=connector_id, params=params, backend=chosen,
                     concurrency_key=concurrency_key(spec, self.workspace), fallback_reason=reason,
                     idempotency_key=idempotency_key)
        try:
            run, created = self.store.create_run(new)
        except IdempotencyConflict as exc:
            raise Conflict(str(exc), code="idempotency_key_reused", run_id=exc.run.id) from None
        if created:
            self.executor.wake()
        return run, created

    def choose_backend(self, requested: str | None) -> tuple[str, str | None]:
        """`local` with the reason Prefect was not used, or a 503 when Prefect is forced and cannot run it."""
        mode = requested or self.settings.backend
        if mode == "prefect":
            raise Unavailable("backend 'prefect' was requested but this gateway has no Prefect path configured",
                              code="prefect_unavailable")
        return "local", (PREFECT_UNAVAILABLE if mode == "auto" else None)

    def wait_for_end(self, run_id: str, timeout: float) -> Run:
        """Poll the store until the run ends or `timeout` passes; returns the latest state either way."""
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            run = self.store.get(run_id)
            if run is None or run.is_terminal or time.monotonic() >= deadline:
                return run
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            interval = min(interval * 1.5, 0.5)
