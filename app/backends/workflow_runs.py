"""Workflow runs on the local path: the engine, with node states, the node cache and connector runs in the run store."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from app.logs import run_id as current_run_id
from app.runs.models import SOURCE_WORKFLOW, Run
from app.runs.store import NewRun, RunStore
from connectors import tracing
from connectors.isolated import run_connector_isolated
from connectors.pipeline import ConnectorRunError, RunCancelled, Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from flows.engine import NodeResult, WorkflowEngine, WorkflowResult
from flows.lease import keep_one
from flows.nodes import NodeFailed, Toolbox
from flows.outcome import CANCELLED, COMPLETED, CRASHED, FAILED, RunError
from flows.workflow_registry import resolve_definition
from flows.workflow_spec import WorkflowSpec

log = logging.getLogger(__name__)


class InlineConnectorRunner:
    """Runs a connector node's connector in the node's own thread, as a connector run of its own in the store.

    The run is inserted already running and held by `owner`, so the store's unique index serialises it with
    every other run of the same DuckDB file or dlt pipeline (it waits for them); its own heartbeat renews the
    lease, and a dead process leaves a lapsed lease that marks it crashed, as for any local run.
    """

    def __init__(self, store: RunStore, registry: ConnectorRegistry, workspace: Workspace, owner: str,
                 lease_seconds: float, poll_seconds: float = 0.2, must_end: Callable[[], bool] = lambda: False):
        self.store = store
        self.must_end = must_end  # the executor's last second of shutdown: the run's process is killed at once
        self.registry = registry
        self.workspace = workspace
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds

    def __call__(self, connector_id: str, params: dict[str, Any], should_stop: Callable[[], bool]) -> dict[str, Any]:
        spec = self.registry.get(connector_id)
        if spec is None:
            raise NodeFailed(f"no connector '{connector_id}'", code="connector_not_found", terminal=True)
        try:
            runnable = spec.with_params(params)
        except ParamsError as exc:
            raise NodeFailed(f"{exc.field}: {exc.message}", code="invalid_params", terminal=True) from None
        parent_id = current_run_id.get()  # the workflow run this node belongs to (None: execute-node)
        parent = self.store.get(parent_id) if parent_id else None
        new = NewRun(kind="connector", target=connector_id, params=params, backend="local",
                     concurrency_key=concurrency_key(spec, self.workspace), fallback_reason="workflow_node",
                     trace_context=tracing.carrier() or None,  # the node's: in the workflow run's trace
                     # the workflow's caller and labels: a tenant's runs include its workflows' connector runs
                     source=SOURCE_WORKFLOW, triggered_by=parent.triggered_by if parent else None,
                     labels=parent.labels if parent else None)
        asked = time.monotonic()  # the lease runs from no earlier than this
        run = self.store.start_inline(new, self.owner, self.lease_seconds)
        while run is None:  # another run holds the connector's destination: wait for it, as a queued run would
            if should_stop():
                raise NodeFailed(f"stopped while waiting for another run of '{connector_id}'", code="cancelled")
            time.sleep(self.poll_seconds)
            asked = time.monotonic()
            run = self.store.start_inline(new, self.owner, self.lease_seconds)
        lost = threading.Event()
        lease = keep_one(run.id, lambda: run.id in self.store.renew_leases(self.owner, [run.id], self.lease_seconds)[0],
                         self.lease_seconds, lost, since=asked)
        try:
            try:
                summary = run_connector_isolated(runnable, self.workspace, should_stop=should_stop,
                                                 # lost: another run may start at once; ending: shutdown's last second
                                                 must_end=lambda: lost.is_set() or self.must_end(),
                                                 trace_context=tracing.carrier())
            finally:
                lease.close()  # the end's record decides from here on
        except Exception as exc:
            error = RunError.of(exc)
            status = CANCELLED if error.code == "cancelled" else FAILED
            if status == CANCELLED and self.must_end():  # nobody cancelled it: its process shuts down
                status, error = CRASHED, RunError.interrupted()
            if not lost.is_set():  # a lost lease writes nothing: the run was recovered elsewhere
                self.store.finish(run.id, self.owner, status, error=error)
            if isinstance(exc, RunCancelled):
                raise NodeFailed(str(exc), code="cancelled", terminal=True) from None
            if isinstance(exc, ConnectorRunError):
                raise NodeFailed(f"connector '{connector_id}' failed in {exc.step}: {exc.message}",
                                 code="connector_failed", failure_class=exc.failure_class) from None
            raise
        result = {**summary.to_dict(), "run_id": run.id}
        self.store.finish(run.id, self.owner, COMPLETED, result=summary.to_dict())
        return result


class NodeRecorder:
    """An engine observer that writes node changes to the store in batches, at most every `interval` seconds.

    Fifty nodes of one layer each changing twice would be a hundred write transactions queued on SQLite's one
    write lock; batched, they are a few, and a reader sees a change at most `interval` late.
    """

    def __init__(self, store: RunStore, run_id: str, spec: WorkflowSpec, interval: float = 0.05):
        self.store = store
        self.run_id = run_id
        self.interval = interval
        self._position = {node.id: index for index, node in enumerate(spec.nodes)}
        self._pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, daemon=True, name=f"flowgate-nodes-{run_id[:8]}")
        self._thread.start()

    def __call__(self, result: NodeResult) -> None:
        with self._lock:
            self._pending[result.id] = result.to_dict()
        self._changed.set()

    def close(self) -> None:
        """Write what is left; call once the workflow has ended, before its run is finished."""
        self._closed.set()
        self._changed.set()
        self._thread.join()
        self._flush()

    def _flush_loop(self) -> None:
        while not self._closed.is_set():
            self._changed.wait()
            self._changed.clear()
            try:
                self._flush()
            except Exception:  # a database hiccup: the next flush (or close) writes the latest states
                log.exception("writing the node states of %s failed", self.run_id)
            self._closed.wait(self.interval)

    def _flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, {}
        if batch:
            self.store.nodes.save(self.run_id, [(self._position[node_id], data) for node_id, data in batch.items()])


def pending_nodes(spec: WorkflowSpec) -> list[dict[str, Any]]:
    """Every node of `spec` as `pending`, in declaration order."""
    layer_of = {node_id: index for index, layer in enumerate(spec.layers()) for node_id in layer}
    return [NodeResult(node.id, node.type, layer_of[node.id]).to_dict() for node in spec.nodes]


def record_pending_nodes(store: RunStore, run_id: str, spec: WorkflowSpec) -> None:
    """Every node as `pending`, so an execution document lists them all from the start."""
    store.nodes.save(run_id, list(enumerate(pending_nodes(spec))))


def stored_spec(run: Run) -> WorkflowSpec:
    """The spec a workflow run stored (a file's `${VAR}`s resolved here, from this process's environment)."""
    return resolve_definition(run.params["workflow"], bool(run.params.get("from_file")))


def run_workflow(run: Run, store: RunStore, toolbox: Toolbox, should_stop: Callable[[], bool]) -> WorkflowResult:
    """Execute a stored workflow run: its definition, inputs and mode come from the run's params."""
    spec = stored_spec(run)
    engine = WorkflowEngine(toolbox, cache=store.node_cache)
    recorder = NodeRecorder(store, run.id, spec)
    try:
        return engine.run(spec, run.params.get("inputs") or {}, run.params.get("mode", "optimized"),
                          observe=recorder, should_stop=should_stop, reuse=run.params.get("reuse"))
    finally:
        recorder.close()
