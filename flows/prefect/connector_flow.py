"""The Prefect flow for a connector: the same ConnectorPipeline the local executor runs, one task per step, while
holding the connector's key in the run store (flows/connector_lock.py), as a local run does."""
from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from prefect.runtime import flow_run
from prefect.states import Cancelled

from connectors.pipeline import ConnectorPipeline, Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from flows.connector_lock import ConnectorLock, LockLost, run_moved_off_prefect
from flows.connector_lock import metadata as lock_metadata
from flows.database import Database
from flows.prefect.contract import FLOW_NAME, summary_artifact_key, tagged_run_id
from flows.prefect.run_trace import run_span
from flows.runtime import RuntimeSettings


@task(cache_policy=NO_CACHE, retries=0)
def pipeline_step(pipeline: ConnectorPipeline, step: str) -> None:
    """One dlt step (recover, extract, normalize, load) as a Prefect task."""
    pipeline.run_step(step)


@flow(name=FLOW_NAME, log_prints=True)
def connector_flow(connector_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one connector from connectors.yaml; publish its load summary as an artifact and return it."""
    with run_span("connector", connector_id):
        return _connector_flow(connector_id, params)


def _connector_flow(connector_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    settings = RuntimeSettings()
    spec = ConnectorRegistry.load(settings.connectors_file).get(connector_id)
    if spec is None:
        raise ValueError(f"no connector '{connector_id}' in {settings.connectors_file}")
    workspace = Workspace(settings.pipelines_dir, settings.duckdb_dir)
    runnable = spec.with_params(params or {})
    database = Database(settings.run_store_url)  # shared with the gateways when DATABASE_URL is
    database.create_tables(lock_metadata)
    try:
        # Never beside a local run (or another flow run) of the same destination: the key in the run store.
        holder = f"prefect:{flow_run.id}:{uuid.uuid4().hex[:8]}"  # one per execution, even of one flow run
        with ConnectorLock(database).hold(concurrency_key(spec, workspace), holder) as lost:
            # Asked while holding the key: the gateway may have taken the run back while this flow run waited.
            moved = (run_id := tagged_run_id(flow_run.tags)) and run_moved_off_prefect(database, run_id)
            if moved:
                return Cancelled(message=f"not executed: {moved}")
            pipeline = ConnectorPipeline(runnable, workspace)
            for step in pipeline.steps:
                if lost.is_set():
                    raise LockLost(f"the lease on connector {connector_id}'s key lapsed before {step}")
                pipeline_step.with_options(name=step)(pipeline, step)
            summary = pipeline.summary().to_dict()
    finally:
        database.dispose()
    create_table_artifact(
        key=summary_artifact_key(connector_id),
        table=[summary],
        description=f"Load summary of connector {connector_id}: rows per table, load ids, destination.")
    return summary

