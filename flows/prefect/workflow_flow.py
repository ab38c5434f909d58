"""The Prefect flow for a workflow: the same engine the local executor runs, each node a task submitted in its layer."""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from connectors import secrets
from connectors.isolated import run_connector_isolated
from connectors.pipeline import ConnectorRunError, RunCancelled, concurrency_key
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from flows.connector_lock import NOT_IN_RUN_STORE, ConnectorLock, LockLost, run_moved_off_prefect, stored_params
from flows.connector_lock import metadata as lock_metadata
from flows.database import Database
from flows.engine import FAILED, NodeResult, WorkflowEngine
from flows.node_cache import SqlNodeCache, metadata
from flows.nodes import NodeFailed, make_toolbox
from flows.outcome import COMPLETED, RunOutcome
from flows.prefect.contract import WORKFLOW_FLOW_NAME, workflow_artifact_key
from flows.prefect.run_trace import run_span
from flows.run_lease import RunLease, holder_of
from flows.runtime import RuntimeSettings
from flows.workflow_registry import resolve_definition
from flows.workflow_spec import Mode, NodeSpec

log = logging.getLogger(__name__)


class NodeTaskFailed(RuntimeError):
    """Raised by a node's task so the Prefect UI shows the node failed; the engine keeps the details."""


@task(cache_policy=NO_CACHE, retries=0)
def node_task(work: Callable[[], NodeResult]) -> dict[str, Any]:
    """One node (the engine does retries, timeouts and caching, so both paths behave the same)."""
    result = work()
    if result.status == FAILED:
        raise NodeTaskFailed((result.error or {}).get("message", f"node {result.id} failed"))
    return result.to_dict()


class _Done:
    """What the engine waits on: the task's end, whatever its state (the engine reads the node's result itself)."""

    def __init__(self, future: PrefectFuture):
        self.future = future

    def result(self) -> None:
        self.future.wait()


def submit_as_task(node: NodeSpec, work: Callable[[], NodeResult]) -> _Done:
    """Submit a node as a Prefect task named after it; tasks of one layer run at once on the task runner."""
    return _Done(node_task.with_options(name=f"{node.id} ({node.type})").submit(work))


def connector_runner(settings: Any, database: Database, holder: str, lock: ConnectorLock | None = None
                     ) -> Callable[[str, dict[str, Any], Callable[[], bool]], dict[str, Any]]:
    """Run a connector node's connector here, in the worker, from the worker's connectors.yaml, holding its key
    in the run store as any run of it does."""
    registry = ConnectorRegistry.load(settings.connectors_file)
    workspace = settings.workspace
    lock = lock or ConnectorLock(database)

    def run(connector_id: str, params: dict[str, Any], should_stop: Callable[[], bool]) -> dict[str, Any]:
        spec = registry.get(connector_id)
        if spec is None:
            raise NodeFailed(f"no connector '{connector_id}'", code="connector_not_found", terminal=True)
        try:
            runnable = spec.with_params(params)
            # one holder per node run: two nodes of one workflow on one connector wait for each other too
            with lock.hold(concurrency_key(spec, workspace), f"{holder}:{uuid.uuid4().hex[:8]}", should_stop) as lost:
                # In a child process, killed at once if the key's lease is lost: a local run may take it then.
                return run_connector_isolated(runnable, workspace, should_stop=should_stop,
                                              must_end=lost.is_set).to_dict()
        except (LockLost, RunCancelled) as exc:
            raise NodeFailed(str(exc), code="cancelled", terminal=True) from None
        except ParamsError as exc:
            raise NodeFailed(f"{exc.field}: {exc.message}", code="invalid_params", terminal=True) from None
        except ConnectorRunError as exc:
            raise NodeFailed(str(exc), code="connector_failed", failure_class=exc.failure_class) from None

    return run


def not_as_accepted(database: Database, run_id: str, given: dict[str, Any]) -> str | None:
    """Why a flow run's parameters must not execute: they are not what the gateway validated and stored for run
    `run_id` (None: they are). Anyone who can reach Prefect's API can create a flow run of this deployment; the
    run store, which only gateways write, says what was accepted. Without this check a definition sent straight to
    Prefect with `from_file: true` would have its ${VAR}s filled in from this worker's environment."""
    stored = stored_params(database, run_id, "workflow")
    if stored is None:
        return f"{NOT_IN_RUN_STORE} has no workflow run {run_id}"
    accepted = {"workflow": stored.get("workflow"), "inputs": stored.get("inputs") or {},
                "mode": stored.get("mode", "optimized"), "from_file": bool(stored.get("from_file")),
                "reuse": stored.get("reuse")}
    differing = [key for key, value in accepted.items() if given.get(key) != value]
    if differing:
        log.error("not executing a flow run of workflow run %s: its %s differ from what the gateway accepted (a "
                  "flow run created through Prefect's API, not by a gateway?)", run_id, ", ".join(differing))
        return f"its {', '.join(differing)} are not what the gateway accepted for run {run_id}"
    return None


@flow(name=WORKFLOW_FLOW_NAME, log_prints=True)
def workflow_flow(run_id: str, workflow: dict[str, Any], inputs: dict[str, Any] | None = None,
                  mode: Mode = "optimized", from_file: bool = False,
                  reuse: dict[str, Any] | None = None) -> dict[str, Any] | State[Any]:
    """Run a workflow definition; publish every node's result as an artifact the gateway reads back.

    A definition from a workflow file arrives with its `${VAR}`s unresolved: they are filled in here, from the
    worker's environment, so Prefect never holds the secrets."""
    with run_span("workflow", str(workflow.get("id", ""))):
        return _workflow_flow(run_id, workflow, inputs, mode, from_file, reuse)


def _workflow_flow(run_id: str, workflow: dict[str, Any], inputs: dict[str, Any] | None, mode: Mode,
                   from_file: bool, reuse: dict[str, Any] | None) -> dict[str, Any] | State[Any]:
    settings = RuntimeSettings()
    for value in settings.secret_values():  # scrubbed from what this worker reports, as in the gateway
        secrets.remember(value)
    database = Database(settings.run_store_url)  # node cache and connector keys: shared with the gateways
    lease: RunLease | None = None
    try:
        # Taken back or ended by the gateway, a run store that is not the gateways', or a definition the gateway
        # did not accept: checked before anything is written there, or a ${VAR} read.
        given = {"workflow": workflow, "inputs": inputs or {}, "mode": mode, "from_file": from_file, "reuse": reuse}
        refused = run_moved_off_prefect(database, run_id) or not_as_accepted(database, run_id, given)
        if refused:
            return Cancelled(message=f"not executed: {refused}")
        # The run is this execution's from here on, or it does not execute (flows/run_lease.py).
        lease = RunLease(database, run_id, holder_of(str(flow_run.id), uuid.uuid4().hex[:8]), settings.lease_seconds)
        if refused := lease.take():
            return Cancelled(message=f"not executed: {refused}")
        lost = threading.Event()
        lease.keep(lost)
        spec = resolve_definition(workflow, from_file)
        database.create_tables(metadata, lock_metadata)
        runner = connector_runner(settings, database, f"prefect:{flow_run.id}:{run_id}")
        engine = WorkflowEngine(make_toolbox(settings, runner), cache=SqlNodeCache(database))
        result = engine.run(spec, inputs or {}, mode, submit=submit_as_task, reuse=reuse, should_stop=lost.is_set)
    finally:
        if lease is not None:
            lease.end()
        database.dispose()
    document = result.to_dict()
    create_table_artifact(key=workflow_artifact_key(run_id), table=[document],
                          description=f"flowgate workflow {spec.id}: every node's status, timing and output.")
    outcome = RunOutcome.of_workflow(result)
    if outcome.status != COMPLETED:
        raise NodeTaskFailed(outcome.error.message if outcome.error else f"workflow {outcome.status}")
    return document
