"""The Prefect flow for a connector: the same ConnectorPipeline the local executor runs, one task per step (each in
a child process, as a local run's), while holding the connector's key in the run store (flows/connector_lock.py)."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from connectors import secrets, tracing
from connectors.isolated import run_connector_isolated, warm_up
from connectors.pipeline import (
    ConnectorPipeline,
    ConnectorRunError,
    LoadSummary,
    RunCancelled,
    Workspace,
    concurrency_key,
)
from connectors.registry import ConnectorRegistry
from connectors.spec import ConnectorSpec
from flows.connector_lock import ConnectorLock, LockLost, run_moved_off_prefect, warn_unless_shared
from flows.connector_lock import metadata as lock_metadata
from flows.database import Database
from flows.outcome import RunError
from flows.prefect.contract import FLOW_NAME, error_artifact_key, summary_artifact_key, tagged_run_id
from flows.prefect.run_trace import run_span
from flows.run_lease import RunLease, holder_of
from flows.runtime import RuntimeSettings


@task(cache_policy=NO_CACHE, retries=0)
def pipeline_step(spec: ConnectorSpec, workspace: Workspace, step: str, must_end: Callable[[], bool]) -> LoadSummary:
    """One dlt step (recover, extract, normalize, load) as a Prefect task, in a child process of its own
    (connectors/isolated.py), killed at once when `must_end` turns true."""
    # The child continues the flow run's trace: its step's span under the run's (flows/prefect/run_trace.py)
    return run_connector_isolated(spec, workspace, must_end=must_end, steps=(step,), trace_context=tracing.carrier())


def run_steps(spec: ConnectorSpec, workspace: Workspace, lost: threading.Event,
              run_step: Callable[..., LoadSummary] | None = None) -> LoadSummary:
    """The connector's steps, each a task, while its key is held: the step in progress when the lease is lost
    (`lost`) is killed at once, since a local run may take the key from then on (the local path does the same).

    A process per step, not one for the run, keeps each step a task of its own in Prefect; dlt leaves what a step
    made in the working folder for the next. `run_step(spec, workspace, step, must_end)`: the task by default."""
    started = time.monotonic()
    done: list[LoadSummary] = []
    for step in ConnectorPipeline.steps:
        if lost.is_set():
            raise LockLost(f"the lease on connector {spec.id}'s key was lost before {step}")
        try:
            done.append((run_step or pipeline_step.with_options(name=step))(spec, workspace, step, lost.is_set))
        except RunCancelled:
            if lost.is_set():
                raise LockLost(f"the lease on connector {spec.id}'s key was lost during {step}: its process was "
                               f"killed") from None
            raise
    return LoadSummary.of_steps(done, time.monotonic() - started)


def publish_error(connector_id: str, exc: Exception) -> None:
    """The failure as the gateway records it (code, step, message, class), so a retry policy can act on its class:
    Prefect's state only has the message."""
    error = RunError.of(exc) if isinstance(exc, ConnectorRunError) else RunError("lock_lost", str(exc))
    create_table_artifact(key=error_artifact_key(connector_id), table=[error.to_dict()],
                          description=f"Why connector {connector_id} failed, and whether a retry can help.")


@flow(name=FLOW_NAME, log_prints=True)
def connector_flow(connector_id: str, params: dict[str, Any] | None = None) -> dict[str, Any] | State[Any]:
    """Run one connector from connectors.yaml; publish its load summary as an artifact and return it (a Cancelled
    state instead when the run is no longer Prefect's to execute)."""
    with run_span("connector", connector_id):
        return _connector_flow(connector_id, params)


def _connector_flow(connector_id: str, params: dict[str, Any] | None) -> dict[str, Any] | State[Any]:
    settings = RuntimeSettings()
    for value in settings.secret_values():  # scrubbed from what this worker reports, as in the gateway
        secrets.remember(value)
    spec = ConnectorRegistry.load(settings.connectors_file).get(connector_id)
    if spec is None:
        raise ValueError(f"no connector '{connector_id}' in {settings.connectors_file}")
    workspace = settings.workspace
    runnable = spec.with_params(params or {})
    warm_up()  # the steps' forkserver imports dlt (and Prefect's engine) while the key is being taken
    database = Database(settings.run_store_url)  # shared with the gateways when DATABASE_URL is
    holder = holder_of(str(flow_run.id), uuid.uuid4().hex[:8])  # one per execution, even of one flow run
    lease: RunLease | None = None
    lost = threading.Event()
    try:
        run_id = tagged_run_id(flow_run.tags)  # None: a flow run of a Prefect schedule
        # Before anything is written there: a run store without this flow run's run is not the gateways'.
        if run_id and (refused := run_moved_off_prefect(database, run_id)):
            return Cancelled(message=f"not executed: {refused}")
        if run_id is None:
            warn_unless_shared(database)
        else:  # the run is this execution's from here on, or it does not execute (flows/run_lease.py)
            lease = RunLease(database, run_id, holder, settings.lease_seconds)
            if refused := lease.take():
                return Cancelled(message=f"not executed: {refused}")
            lease.keep(lost)
        database.create_tables(lock_metadata)
        # Never beside a local run (or another flow run) of the same destination: the key in the run store.
        with ConnectorLock(database).hold(concurrency_key(spec, workspace), holder, should_stop=lost.is_set,
                                          lost=lost) as lost:
            # Asked again holding the key: the gateway may have taken the run back while this flow run waited.
            if run_id and (refused := run_moved_off_prefect(database, run_id)):
                return Cancelled(message=f"not executed: {refused}")
            try:
                summary = run_steps(runnable, workspace, lost).to_dict()
            except (ConnectorRunError, LockLost) as exc:
                publish_error(connector_id, exc)
                raise
    finally:
        if lease is not None:
            lease.end()
        database.dispose()
    create_table_artifact(
        key=summary_artifact_key(connector_id),
        table=[summary],
        description=f"Load summary of connector {connector_id}: rows per table, load ids, destination.")
    return summary

