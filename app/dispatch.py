"""Dispatcher: turns an accepted trigger into a stored run and decides where it runs, Prefect or local."""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from app.config import Settings
from app.errors import Conflict, NotFound, TooManyRequests, Unavailable, ValidationFailed
from app.metrics import FALLBACKS, TRIGGERS, observe_run_end
from app.prefect_client import (
    FLOW_NAME, STATE_TO_STATUS, SUMMARY_ARTIFACT_PREFIX, WORKFLOW_ARTIFACT_PREFIX, WORKFLOW_DEPLOYMENT,
    WORKFLOW_FLOW_NAME, PrefectClient, PrefectError,
)
from app.prefect_route import PrefectRoute
from app.runs.executor import LocalExecutor
from app.runs.models import COMPLETED, FAILED, TERMINAL, Run, utcnow
from app.runs.store import IdempotencyConflict, NewRun, QueueFull, RunStore
from connectors.pipeline import Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from flows.workflow_spec import WorkflowSpec

log = logging.getLogger(__name__)

NOT_CONFIGURED = "prefect_not_configured"


class Dispatcher:
    """The one place that knows how a trigger becomes a run and follows it; views only call it."""

    def __init__(self, settings: Settings, store: RunStore, registry: ConnectorRegistry,
                 executor: LocalExecutor, workspace: Workspace, prefect: PrefectRoute | None = None):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.executor = executor
        self.workspace = workspace
        self.prefect = prefect
        self._sync_stop = threading.Event()

    # --- triggering -------------------------------------------------------------------------

    def trigger_connector(self, connector_id: str, params: dict[str, Any], backend: str | None = None,
                          idempotency_key: str | None = None, callback_url: str | None = None) -> tuple[Run, bool]:
        """Validate, store and dispatch a connector run; returns the run and whether it is new."""
        spec = self.registry.get(connector_id)
        if spec is None:
            raise NotFound(f"no connector '{connector_id}'", code="connector_not_found")
        try:
            spec.with_params(params)
        except ParamsError as exc:
            raise ValidationFailed.of_field(exc.field, exc.message) from None
        mode = backend or self.settings.backend
        deployment_id, reason = self._choose(connector_id, mode)
        new = NewRun(kind="connector", target=connector_id, params=params,
                     backend="prefect" if deployment_id else "local",
                     concurrency_key=concurrency_key(spec, self.workspace), fallback_reason=reason,
                     idempotency_key=idempotency_key, callback_url=callback_url,
                     max_queued=self.settings.max_queued_per_target)
        return self._store_and_dispatch(new, deployment_id, forced=mode == "prefect")

    def _store_and_dispatch(self, new: NewRun, deployment_id: str | None, forced: bool,
                            parameters: Callable[[Run], dict[str, Any]] | None = None) -> tuple[Run, bool]:
        """Store the run (or find the one its idempotency key names), then hand a new one to Prefect or the executor."""
        try:
            run, created = self.store.create_run(new)
        except IdempotencyConflict as exc:
            raise Conflict(str(exc), code="idempotency_key_reused", run_id=exc.run.id) from None
        except QueueFull as exc:
            raise TooManyRequests(f"{exc} (FLOWGATE_MAX_QUEUED_PER_TARGET)", code="queue_full",
                                  headers={"Retry-After": "30"}) from None
        if not created:
            TRIGGERS.labels(run.kind, run.backend, "duplicate").inc()
            return run, False
        if deployment_id:
            run = self._create_flow_run(run, deployment_id, forced, parameters(run) if parameters else None)
        self._accepted(run)
        return run, True

    def _accepted(self, run: Run) -> None:
        TRIGGERS.labels(run.kind, run.backend, "accepted").inc()
        if run.fallback_reason:
            FALLBACKS.labels(run.fallback_reason).inc()
        log.info("run %s accepted: %s %s on %s%s", run.id, run.kind, run.target, run.backend,
                 f" ({run.fallback_reason})" if run.fallback_reason else "", extra={"run_id": run.id})
        if run.backend == "local":
            self.executor.wake()

    def trigger_workflow(self, spec: WorkflowSpec, inputs: dict[str, Any], mode: str, backend: str | None = None,
                         idempotency_key: str | None = None, callback_url: str | None = None,
                         file_definition: dict[str, Any] | None = None) -> tuple[Run, bool]:
        """Store and dispatch a workflow run; the definition travels with the run, so any process can run it.

        `file_definition`: the workflow as its file says it (`${VAR}`s unresolved), stored instead of `spec`."""
        chosen = backend or self.settings.backend
        deployment_id, reason = self._choose(WORKFLOW_DEPLOYMENT, chosen, flow_name=WORKFLOW_FLOW_NAME)
        params = {"inputs": inputs, "mode": mode, "from_file": file_definition is not None,
                  "workflow": file_definition or spec.model_dump(mode="json")}
        new = NewRun(kind="workflow", target=spec.id, params=params, backend="prefect" if deployment_id else "local",
                     concurrency_key=f"workflow-run:{uuid.uuid4().hex}", fallback_reason=reason,
                     idempotency_key=idempotency_key, callback_url=callback_url,
                     max_queued=self.settings.max_queued_per_target)
        return self._store_and_dispatch(new, deployment_id, forced=chosen == "prefect",
                                        parameters=lambda run: {"run_id": run.id, **params})

    def _choose(self, deployment: str, mode: str, flow_name: str = FLOW_NAME) -> tuple[str | None, str | None]:
        """(deployment id, None) to use Prefect, or (None, why not) to run locally."""
        if mode == "local":
            return None, None
        if self.prefect is None:
            if mode == "prefect":
                raise Unavailable("backend 'prefect' was requested but PREFECT_API_URL is not set",
                                  code="prefect_unavailable", reason=NOT_CONFIGURED)
            return None, NOT_CONFIGURED
        route = self.prefect.route(deployment, flow_name)
        if not route.ok and mode == "prefect":
            raise Unavailable(f"backend 'prefect' was requested but Prefect cannot take the run: {route.detail}",
                              code="prefect_unavailable", reason=route.reason)
        return route.deployment_id, route.reason

    def _create_flow_run(self, run: Run, deployment_id: str, forced: bool,
                         parameters: dict[str, Any] | None = None) -> Run:
        # Prefect scopes idempotency keys to the flow: prefix with the target so keys never collide.
        key = f"flowgate:{run.kind}:{run.target}:{run.idempotency_key or run.id}"
        try:
            flow_run = self.prefect.client.create_flow_run(
                deployment_id, parameters or {"connector_id": run.target, "params": run.params}, key,
                tags=["flowgate", f"flowgate-run:{run.id}"])
        except PrefectError as exc:
            if exc.reason == "prefect_unreachable":
                self.prefect.record_failure(exc)
            if forced:
                self.store.update_unfinished(run.id, status=FAILED, finished_at=utcnow(), error={
                    "code": "prefect_create_failed", "message": exc.message})
                raise Unavailable(f"Prefect failed to create the flow run: {exc.message}",
                                  code="prefect_unavailable", run_id=run.id) from None
            log.warning("creating a flow run for %s failed (%s); running it locally", run.id, exc.message)
            return self.store.update_unfinished(run.id, backend="local", fallback_reason="prefect_create_failed")
        state = flow_run.get("state") or {}
        return self.store.update_unfinished(run.id, prefect_flow_run_id=str(flow_run["id"]),
                                            prefect_state=state.get("name")) or self.store.get(run.id)

    # --- following --------------------------------------------------------------------------

    def refresh(self, run: Run) -> Run:
        """The run with its Prefect state brought up to date (a local run, or an unreachable Prefect: as stored)."""
        if (run.backend != "prefect" or run.is_terminal or not run.prefect_flow_run_id or self.prefect is None
                or self.prefect.circuit_open):
            return run
        try:
            return self._apply(run, self.prefect.client.read_flow_run(run.prefect_flow_run_id))
        except PrefectError as exc:
            if exc.reason == "prefect_unreachable":
                self.prefect.record_failure(exc)
            log.info("cannot refresh run %s from Prefect: %s", run.id, exc.message)
            return run

    def _apply(self, run: Run, flow_run: dict[str, Any]) -> Run:
        """Record a flow run's state on its run (and, once completed, the load summary artifact)."""
        state = flow_run.get("state") or {}
        status = STATE_TO_STATUS.get(state.get("type"), run.status)
        if status == run.status and state.get("name") == run.prefect_state:
            return run
        values: dict[str, Any] = {"status": status, "prefect_state": state.get("name")}
        if flow_run.get("start_time") and not run.started_at:
            values["started_at"] = _parse_time(flow_run["start_time"])
        if status in TERMINAL:
            values["finished_at"] = _parse_time(flow_run.get("end_time")) or utcnow()
            if run.kind == "workflow":
                return self._apply_workflow(run, status, state, values)
            if status == COMPLETED:
                rows = self.prefect.client.read_table_artifact(run.prefect_flow_run_id, SUMMARY_ARTIFACT_PREFIX)
                values["result"] = rows[0] if rows else None
            else:
                values["error"] = {"code": f"prefect_{status}", "message": state.get("message") or state.get("name")}
        return self._update(run, values)

    def _update(self, run: Run, values: dict[str, Any]) -> Run:
        """Write a Prefect run's new state; a run this call ended is counted once (another worker may race)."""
        updated = self.store.update_unfinished(run.id, **values)
        if updated is None:
            return self.store.get(run.id)
        if updated.is_terminal:
            observe_run_end(updated.kind, updated.target, updated.status, updated.started_at, updated.finished_at)
        return updated

    def _apply_workflow(self, run: Run, status: str, state: dict[str, Any], values: dict[str, Any]) -> Run:
        """A finished Prefect workflow run: its nodes and outputs from the artifact the flow published."""
        rows = self.prefect.client.read_table_artifact(run.prefect_flow_run_id, f"{WORKFLOW_ARTIFACT_PREFIX}-{run.id}")
        document = rows[0] if rows else None
        if document:
            spec_order = {node["id"]: index for index, node in enumerate(run.params["workflow"]["nodes"])}
            self.store.save_nodes(run.id, [(spec_order.get(node["id"], 0), node) for node in document["nodes"]])
            values["result"] = {key: document[key] for key in ("workflow_id", "mode", "layers", "duration_seconds",
                                                                "outputs")}
        if status != COMPLETED:
            failed = [node["id"] for node in (document or {}).get("nodes", []) if node["status"] == "failed"]
            values["error"] = {"code": "node_failed" if failed else f"prefect_{status}", "nodes": failed or None,
                               "message": state.get("message") or state.get("name")}
        return self._update(run, values)

    def prefect_logs(self, run: Run, offset: int, limit: int) -> list[dict[str, Any]]:
        """A Prefect run's log lines from Prefect; a 503 problem while Prefect cannot be asked."""
        if self.prefect is None or self.prefect.circuit_open:
            raise Unavailable("Prefect cannot be reached for this run's logs right now", code="prefect_unavailable",
                              headers={"Retry-After": "10"})
        try:
            return self.prefect.client.read_logs(run.prefect_flow_run_id, offset, limit)
        except PrefectError as exc:
            if exc.reason == "prefect_unreachable":
                self.prefect.record_failure(exc)
            raise Unavailable(f"reading this run's logs from Prefect failed: {exc.message}",
                              code="prefect_unavailable", headers={"Retry-After": "10"}) from None

    def live_nodes(self, run: Run, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A Prefect workflow run still going: its nodes' states read from its task runs (named "<id> (<type>)").

        The flow's artifact replaces them once the run ends; an unreachable Prefect leaves `nodes` as they are.
        """
        if self.prefect is None or self.prefect.circuit_open or not run.prefect_flow_run_id:
            return nodes
        try:
            task_runs = self.prefect.client.read_task_runs(run.prefect_flow_run_id)
        except PrefectError as exc:
            log.info("cannot read the task runs of %s: %s", run.id, exc.message)
            return nodes
        by_id = {task_run["name"].rsplit(" (", 1)[0]: task_run for task_run in task_runs}
        live = []
        for node in nodes:
            task_run = by_id.get(node["id"])
            if task_run is not None:
                state = (task_run.get("state") or {}).get("type")
                node = {**node, "status": _NODE_STATUS.get(state, node["status"]),
                        "attempts": task_run.get("run_count") or 0,
                        "started_at": task_run.get("start_time"), "finished_at": task_run.get("end_time")}
            live.append(node)
        return live

    def end_overdue_prefect_runs(self) -> list[Run]:
        """Prefect runs unfinished past FLOWGATE_RUN_TIMEOUT_SECONDS end as failed here (and are cancelled there,
        if Prefect answers): a Prefect that vanished for good must not leave runs open forever."""
        timeout = self.settings.run_timeout_seconds
        overdue = self.store.fail_overdue("prefect", utcnow() - timedelta(seconds=timeout), {
            "code": "run_timeout", "message": f"not finished within FLOWGATE_RUN_TIMEOUT_SECONDS ({timeout:g} s)"})
        for run in overdue:
            log.warning("Prefect run %s timed out after %g s", run.id, timeout, extra={"run_id": run.id})
            if run.prefect_flow_run_id and self.prefect is not None and not self.prefect.circuit_open:
                try:
                    self.prefect.client.cancel_flow_run(run.prefect_flow_run_id)
                except PrefectError as exc:
                    log.info("cancelling timed-out flow run %s failed: %s", run.prefect_flow_run_id, exc.message)
        return overdue

    def sync_prefect_runs(self) -> int:
        """Bring every unfinished Prefect run up to date with one call to Prefect; returns how many changed."""
        self.end_overdue_prefect_runs()
        runs = {run.prefect_flow_run_id: run for run in self.store.unfinished("prefect") if run.prefect_flow_run_id}
        if not runs or self.prefect is None or self.prefect.circuit_open:
            return 0
        changed = 0
        for flow_run in self.prefect.client.read_flow_runs(list(runs)):
            run = runs.get(str(flow_run["id"]))
            if run is not None and self._apply(run, flow_run) is not run:
                changed += 1
        return changed

    def cancel(self, run_id: str) -> Run | None:
        """Cancel in the store; a Prefect run is also cancelled in Prefect."""
        run = self.store.cancel(run_id)
        if run is not None and run.backend == "prefect" and run.prefect_flow_run_id and self.prefect:
            try:
                self.prefect.client.cancel_flow_run(run.prefect_flow_run_id)
            except PrefectError as exc:
                log.warning("cancelling flow run %s in Prefect failed: %s", run.prefect_flow_run_id, exc.message)
        return run

    def wait_for_end(self, run_id: str, timeout: float) -> Run:
        """Poll until the run ends or `timeout` passes; returns the latest state either way."""
        deadline = time.monotonic() + timeout
        interval = 0.05
        while True:
            run = self.refresh(self.store.get(run_id))
            if run.is_terminal or time.monotonic() >= deadline:
                return run
            time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            interval = min(interval * 1.5, 0.5)

    def start_sync(self, every_seconds: float = 2.0) -> None:
        """Follow unfinished Prefect runs in the background, so their records end even if nobody asks."""
        if self.prefect is None:
            return

        def loop() -> None:
            while not self._sync_stop.wait(every_seconds):
                try:
                    self.sync_prefect_runs()
                except PrefectError as exc:
                    log.info("syncing Prefect runs failed: %s", exc.message)
                except Exception:  # a hiccup must not end the loop
                    log.exception("syncing Prefect runs failed")

        threading.Thread(target=loop, name="flowgate-prefect-sync", daemon=True).start()

    def stop_sync(self) -> None:
        self._sync_stop.set()


# Prefect task run state -> workflow node status, while a Prefect workflow run is going.
_NODE_STATUS = {"SCHEDULED": "pending", "PENDING": "pending", "RUNNING": "running", "COMPLETED": "completed",
                "FAILED": "failed", "CRASHED": "failed", "CANCELLED": "cancelled", "CANCELLING": "running"}


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def make_prefect_route(settings: Settings) -> PrefectRoute | None:
    """The Prefect route for these settings, or None when no Prefect is configured."""
    if not settings.prefect_api_url:
        return None
    client = PrefectClient(settings.prefect_api_url, settings.prefect_api_key, settings.prefect_timeout_seconds)
    return PrefectRoute(client, FLOW_NAME, settings.prefect_pool)
