"""The Prefect flow for a connector: the same ConnectorPipeline the local executor runs, one task per step."""
from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from connectors.pipeline import ConnectorPipeline, Workspace
from connectors.registry import ConnectorRegistry
from flows.prefect.contract import FLOW_NAME, summary_artifact_key
from flows.runtime import RuntimeSettings


@task(cache_policy=NO_CACHE, retries=0)
def pipeline_step(pipeline: ConnectorPipeline, step: str) -> None:
    """One dlt step (recover, extract, normalize, load) as a Prefect task."""
    pipeline.run_step(step)


@flow(name=FLOW_NAME, log_prints=True)
def connector_flow(connector_id: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one connector from connectors.yaml; publish its load summary as an artifact and return it."""
    settings = RuntimeSettings()
    spec = ConnectorRegistry.load(settings.connectors_file).get(connector_id)
    if spec is None:
        raise ValueError(f"no connector '{connector_id}' in {settings.connectors_file}")
    pipeline = ConnectorPipeline(spec.with_params(params or {}),
                                 Workspace(settings.pipelines_dir, settings.duckdb_dir))
    for step in pipeline.steps:
        pipeline_step.with_options(name=step)(pipeline, step)
    summary = pipeline.summary().to_dict()
    create_table_artifact(
        key=summary_artifact_key(connector_id),
        table=[summary],
        description=f"Load summary of connector {connector_id}: rows per table, load ids, destination.")
    return summary

