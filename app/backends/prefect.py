"""The Prefect backend: flow runs created from deployments, followed until they end, cancelled, their logs read
(the background follower of every unfinished run, PrefectSync, is a loop of its own: prefect_sync.py).

Everything here talks to Prefect through PrefectClient (the one HTTP boundary) and PrefectRoute (probes and the
circuit breaker); the dispatcher decides whether a run comes here at all. Over 300 lines because a flow run's every
end (with its error and failure class) and a cancel's every answer are read here, side by side.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from app.backends import LogPage
from app.backends.prefect_client import PrefectClient, PrefectError, PrefectUnavailable
from app.backends.prefect_route import PrefectRoute
from app.errors import Unavailable
from app.metrics import observe_run_end, observe_run_start
from app.runs.models import Run, utcnow
from app.runs.store import RunStore
from flows.connector_lock import NOT_IN_RUN_STORE
from flows.outcome import CANCELLED, COMPLETED, CRASHED, FAILED, TERMINAL, RunError
from flows.prefect.contract import (
    ERROR_ARTIFACT_PREFIX,
    FLOW_NAME,
    SCHEDULE_TAG,
    STATE_TO_STATUS,
    SUMMARY_ARTIFACT_PREFIX,
    TRACEPARENT_LABEL,
    attempt_tag,
    run_tag,
    trace_tag,
    workflow_artifact_key,
)

log = logging.getLogger(__name__)
WORKER_RUN_STORE_MISMATCH = "worker_run_store_mismatch"  # the error code of such a run (see _error)

# Prefect task run state -> workflow node status, while a Prefect workflow run is going.
_NODE_STATUS = {"SCHEDULED": "pending", "PENDING": "pending", "RUNNING": "running", "COMPLETED": "completed",
                "FAILED": "failed", "CRASHED": "failed", "CANCELLED": "cancelled", "CANCELLING": "running"}


class PrefectBackend:
    """Runs as Prefect flow runs; `route` is None when no Prefect is configured (runs of an earlier
    configuration are then shown as stored)."""

    name = "prefect"

    def __init__(self, store: RunStore, route: PrefectRoute | None, run_timeout_seconds: float):
        self.store = store
        self.route = route
        self.run_timeout_seconds = run_timeout_seconds

    @property
    def available(self) -> bool:
        """Prefect is configured and its circuit is closed."""
        return self.route is not None and not self.route.circuit_open

    @property
    def client(self) -> PrefectClient:
        assert self.route is not None
        return self.route.client

    def note_failure(self, exc: PrefectError) -> None:
        if exc.reason == "prefect_unreachable" and self.route is not None:
            self.route.record_failure(exc)

    # --- submitting -------------------------------------------------------------------------

    def submit(self, run: Run, deployment_id: str | None = None) -> Run:
        """Create the run's flow run from `deployment_id`.

        Raises PrefectError only when Prefect certainly did not create it (then it may run elsewhere). When the
        answer was lost (a timeout, a 5xx), the flow run may exist: the create is asked again under the same
        idempotency key, and if that is lost too the run stays queued here, awaiting dispatch, for the sync to
        settle. It never runs locally while a flow run of it may exist.
        """
        if deployment_id is None:  # the dispatcher and the sync route a run to a deployment first
            raise PrefectError(f"run {run.id} has no deployment to create its flow run from")
        try:
            return self._create(run, deployment_id)
        except PrefectUnavailable as exc:
            self.note_failure(exc)
            if not exc.maybe_done:
                raise
            log.warning("creating the flow run of %s went unanswered (%s); asking again", run.id, exc.message)
        try:
            return self._create(run, deployment_id)
        except PrefectUnavailable as exc:
            self.note_failure(exc)
            log.warning("the flow run of %s is still unconfirmed (%s); the sync settles it", run.id, exc.message,
                        extra={"run_id": run.id})
            return run

    def _create(self, run: Run, deployment_id: str) -> Run:
        # Keyed on the run, not the caller's key: Prefect keeps a key for good, and one flowgate had forgotten with
        # its run (retention) gave a new run the old flow run back. Callers' keys are flowgate's to dedupe.
        key = f"flowgate:{run.kind}:{run.target}:{run.id}"
        tags = ["flowgate", run_tag(run.id), *([trace_tag(run.trace_id)] if run.trace_id else []),
                *(f"label:{name}={value}" for name, value in (run.labels or {}).items())]
        if run.scheduled_for:  # a schedule's slot: the deployment has no schedule, the gateway fired it
            tags += [SCHEDULE_TAG, f"{SCHEDULE_TAG}:{run.scheduled_for.isoformat()}"]
        if (run.attempt or 1) > 1:  # a retry is a new flow run: its attempt in its key and a tag of its own
            key, tags = f"{key}:attempt-{run.attempt}", [*tags, attempt_tag(run.id, run.attempt)]
        trace = run.trace_context or {}
        flow_run = self.client.create_flow_run(
            deployment_id, flow_parameters(run), key, tags=tags,
            labels={TRACEPARENT_LABEL: trace["traceparent"]} if trace.get("traceparent") else None)
        return self.record_flow_run(run, flow_run)

    def record_flow_run(self, run: Run, flow_run: dict[str, Any]) -> Run:
        state = flow_run.get("state") or {}
        return self.store.record_flow_run(run.id, str(flow_run["id"]), state.get("name")) or self.store.get_one(run.id)

    # --- following --------------------------------------------------------------------------

    def refresh(self, run: Run) -> Run:
        """The run with its Prefect state brought up to date (an unreachable Prefect: as stored)."""
        if run.is_terminal or not run.prefect_flow_run_id or not self.available:
            return run
        try:
            return self.apply_flow_run(run, self.client.read_flow_run(run.prefect_flow_run_id))
        except PrefectError as exc:
            self.note_failure(exc)
            log.info("cannot refresh run %s from Prefect: %s", run.id, exc.message)
            return run

    def apply_flow_run(self, run: Run, flow_run: dict[str, Any]) -> Run:
        """Record a flow run's state on its run (and, once completed, the load summary artifact)."""
        state = flow_run.get("state") or {}
        status = STATE_TO_STATUS.get(state.get("type") or "", run.status)
        if status == run.status and state.get("name") == run.prefect_state:
            return run
        started_at = _parse_time(flow_run.get("start_time")) if not run.started_at else None
        if status not in TERMINAL:
            return self._record(run, status, state, started_at)
        finished_at = _parse_time(flow_run.get("end_time")) or utcnow()
        flow_run_id = str(flow_run["id"])
        if status == CANCELLED and not run.cancel_requested:
            # Nobody asked flowgate: its flow refused to run (failed), or Prefect, a worker's shutdown, a lost
            # concurrency slot or someone in Prefect's UI cut it off (crashed, saying so). Never `cancelled`.
            refused = self._error(run, flow_run_id, status, state)
            if refused.code != WORKER_RUN_STORE_MISMATCH:
                refused = RunError("cut_off", f"Prefect ended the flow run {state.get('name') or 'Cancelled'} "
                                              f"without a cancel from flowgate: "
                                              f"{state.get('message') or 'no reason given'}")
            return self._record(run, CRASHED if refused.code == "cut_off" else FAILED, state, started_at,
                                finished_at, None, refused)
        if run.kind == "workflow":
            return self._apply_workflow(run, flow_run_id, status, state, started_at, finished_at)
        result: dict[str, Any] | None = None
        error: RunError | None = None
        if status == COMPLETED:
            rows = self.client.read_table_artifact(flow_run_id, SUMMARY_ARTIFACT_PREFIX)
            result = rows[0] if rows else None
        else:
            error = self._error(run, flow_run_id, status, state)
            if error.code == "lock_lost":  # cut off by its lease on the connector's key, not failed by itself
                status = CRASHED
        return self._record(run, status, state, started_at, finished_at, result, error)

    def _error(self, run: Run, flow_run_id: str, status: str, state: dict[str, Any],
               nodes: list[dict[str, Any]] | None = None) -> RunError:
        """Why a flow run did not complete, with its class: a workflow's first failed node's (`nodes`), the error a
        connector's flow published, crashed for a crash; else Prefect's state, terminal (never retried). A flow
        that found no such run in its worker's run store, although this gateway has it, says the workers'
        DATABASE_URL is not this gateway's (readiness shows it)."""
        message = state.get("message") or state.get("name") or ""
        if NOT_IN_RUN_STORE in message:
            log.error("run %s was not executed: its Prefect worker's run store does not hold it; the workers' "
                      "DATABASE_URL is not this gateway's", run.id, extra={"run_id": run.id})
            return RunError(WORKER_RUN_STORE_MISMATCH, message)
        if nodes:
            return RunError("node_failed", message, nodes=[node["id"] for node in nodes],
                            failure_class=(nodes[0].get("error") or {}).get("failure_class", "terminal"))
        if status == CRASHED:
            return RunError("prefect_crashed", message, failure_class="crashed")
        rows = self.client.read_table_artifact(flow_run_id, ERROR_ARTIFACT_PREFIX) \
            if status == FAILED and run.kind == "connector" else None
        if rows:
            published = rows[0]
            return RunError(published.get("code") or "connector_failed", published.get("message") or message,
                            step=published.get("step"), failure_class=published.get("failure_class"))
        return RunError(f"prefect_{status}", message)

    def _apply_workflow(self, run: Run, flow_run_id: str, status: str, state: dict[str, Any],
                        started_at: datetime | None, finished_at: datetime) -> Run:
        """A finished Prefect workflow run: its nodes and outputs from the artifact the flow published."""
        rows = self.client.read_table_artifact(flow_run_id, workflow_artifact_key(run.id))
        document = rows[0] if rows else None
        result: dict[str, Any] | None = None
        error: RunError | None = None
        if document:
            spec_order = {node["id"]: index for index, node in enumerate(run.params["workflow"]["nodes"])}
            self.store.nodes.save(run.id, [(spec_order.get(node["id"], 0), node) for node in document["nodes"]])
            result = {key: document[key] for key in ("workflow_id", "mode", "layers", "duration_seconds", "outputs")}
        if status != COMPLETED:
            failed = [node for node in (document or {}).get("nodes", []) if node["status"] == "failed"]
            error = self._error(run, flow_run_id, status, state, nodes=failed or None)
        return self._record(run, status, state, started_at, finished_at, result, error)

    def _record(self, run: Run, status: str, state: dict[str, Any], started_at: datetime | None,
                finished_at: datetime | None = None, result: dict[str, Any] | None = None,
                error: RunError | None = None) -> Run:
        """Write a Prefect run's new state; a run this call ended is counted once (another worker may race)."""
        updated = self.store.record_prefect_state(run.id, status, state.get("name"), started_at, finished_at,
                                                  result, error)
        if updated is None:
            return self.store.get_one(run.id)
        if started_at and not run.started_at:
            observe_run_start(updated)
        if updated.is_terminal:
            observe_run_end(updated.kind, updated.target, updated.status, updated.started_at, updated.finished_at,
                            updated.result, backend="prefect")
        return updated

    def logs(self, run: Run, after: int, limit: int) -> LogPage:
        """A Prefect run's log lines from Prefect; a 503 problem while Prefect cannot be asked. A run with no flow run
        (its create unconfirmed, or waiting for its next attempt) has none there."""
        if run.prefect_flow_run_id is None:
            return LogPage("prefect", [], None)
        if not self.available:
            raise Unavailable("Prefect cannot be reached for this run's logs right now", code="prefect_unavailable",
                              headers={"Retry-After": "10"})
        try:
            lines = self.client.read_logs(run.prefect_flow_run_id, after, limit)
        except PrefectError as exc:
            self.note_failure(exc)
            raise Unavailable(f"reading this run's logs from Prefect failed: {exc.message}",
                              code="prefect_unavailable", headers={"Retry-After": "10"}) from None
        items = [{"at": line["timestamp"], "level": logging.getLevelName(line.get("level", 20)),
                  "logger": line.get("name") or "", "message": line.get("message") or ""} for line in lines]
        return LogPage("prefect", items, after + len(items) if len(items) == limit else None)

    def live_nodes(self, run: Run, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A Prefect workflow run still going: its nodes' states read from its task runs (named "<id> (<type>)").

        The flow's artifact replaces them once the run ends; an unreachable Prefect leaves `nodes` as they are.
        """
        if run.is_terminal or not self.available or not run.prefect_flow_run_id:
            return nodes
        try:
            task_runs = self.client.read_task_runs(run.prefect_flow_run_id)
        except PrefectError as exc:
            log.info("cannot read the task runs of %s: %s", run.id, exc.message)
            return nodes
        by_id = {task_run["name"].rsplit(" (", 1)[0]: task_run for task_run in task_runs}
        live = []
        for node in nodes:
            task_run = by_id.get(node["id"])
            if task_run is not None:
                state = (task_run.get("state") or {}).get("type")
                node = {**node, "status": _NODE_STATUS.get(state or "", node["status"]),
                        "attempts": task_run.get("run_count") or 0,
                        "started_at": task_run.get("start_time"), "finished_at": task_run.get("end_time")}
            live.append(node)
        return live

    def cancel(self, run: Run) -> Run | None:
        """Cancel in Prefect first; the store follows only what Prefect answered. A flow run no worker has taken
        is cancelled at once; one a worker has turns `cancelling` until Prefect reports its end; one that ended
        first keeps its end. A Prefect that does not answer changes nothing: 503, and the run is still followed.
        A run with no flow run (waiting for its next attempt, or its create unconfirmed) is cancelled in the store:
        a flow run of it that Prefect created after all finds it ended there and does not execute."""
        run = self.refresh(run)
        if run.is_terminal:
            return run
        if run.prefect_flow_run_id is None:
            return self.store.cancel(run.id)
        try:
            after = self.client.cancel_flow_run(run.prefect_flow_run_id)
        except PrefectError as exc:
            self.note_failure(exc)
            raise Unavailable(f"Prefect did not confirm the cancellation ({exc.message}); the run goes on",
                              code="prefect_unavailable", headers={"Retry-After": "10"}) from None
        if after == "CANCELLED":
            return self.store.cancel(run.id)
        if after is None:  # it ended before the cancel arrived
            return self.refresh(self.store.get_one(run.id))
        if after == "CANCELLING" and self._never_started(run.prefect_flow_run_id):
            return self._cancel_unstarted(run.id, run.prefect_flow_run_id)
        return self.store.request_cancel(run.id) or self.store.get(run.id)  # it ended meanwhile

    def _never_started(self, flow_run_id: str) -> bool:
        """A CANCELLING flow run that never ran (a worker had claimed it): Prefect refuses RUNNING from CANCELLING,
        so its flow cannot start now either. An unreadable flow run counts as started (the cautious answer)."""
        try:
            return not self.client.read_flow_run(flow_run_id).get("start_time")
        except PrefectError as exc:
            self.note_failure(exc)
            return False

    def _cancel_unstarted(self, run_id: str, flow_run_id: str) -> Run | None:
        """Cancel a run whose flow run a worker claimed but never started. Nothing stops it in 3.8.8 once the
        worker has handed it to its process (the flow only finds CANCELLING and exits), and it holds the
        deployment's slot until Prefect's CANCELLING timeout (300 s). The run is recorded cancelled first, the flow
        run closed second: a process that proposes RUNNING after the close (accepted from CANCELLED) finds its
        run ended in the run store and does not execute."""
        cancelled = self.store.cancel(run_id)
        try:
            self.client.end_cancelling_flow_run(flow_run_id, "cancelled through flowgate before it started")
        except PrefectError as exc:
            self.note_failure(exc)
            log.info("closing cancelled flow run %s failed (%s); Prefect ends it after its CANCELLING timeout",
                     flow_run_id, exc.message)
        return cancelled


def flow_parameters(run: Run) -> dict[str, Any]:
    """The flow run's parameters, from the run alone (so any process can create it)."""
    if run.kind == "workflow":
        return {"run_id": run.id, **run.params}
    return {"connector_id": run.target, "params": run.params}


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def make_prefect_route(settings: Any) -> PrefectRoute | None:
    """The Prefect route for these settings, or None when no Prefect is configured."""
    if not settings.prefect_api_url:
        return None
    client = PrefectClient(settings.prefect_api_url, settings.prefect_api_key, settings.prefect_timeout_seconds)
    return PrefectRoute(client, FLOW_NAME, settings.prefect_pool,
                        worker_max_age_seconds=settings.prefect_worker_max_age_seconds)
