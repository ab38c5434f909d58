"""Connectors: what can be run, as declared in connectors.yaml (secrets redacted), with latest runs."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from app import services
from app.api.inputs import json_object, query, validated
from app.api.runs import run_out
from app.api.schedules import schedule_out
from app.auth import requires
from app.errors import GatewayTimeout, NotFound, Unavailable, ValidationFailed
from app.schemas import (
    ConnectorDetail,
    ConnectorList,
    ConnectorOut,
    ConnectorSchema,
    ConnectorStats,
    PreviewOut,
    PreviewRequest,
    StatsQuery,
)
from app.waits import inline_slot
from connectors.isolated import PreviewTimedOut, preview_isolated
from connectors.pipeline import ConnectorRunError
from connectors.preview import preview_changes
from connectors.schema import DestinationBusy, destination_schema
from connectors.shown_paths import shown_path, shown_spec, without_project
from connectors.spec import ConnectorSpec, ParamsError

bp = Blueprint("connectors", __name__, url_prefix="/api/v1/connectors")


@bp.get("")
def list_connectors() -> dict[str, Any]:
    """Every configured connector, in file order."""
    items = [ConnectorOut(id=spec.id, description=spec.description, source_kind=spec.source.kind,
                          destination_kind=spec.destination.kind, dataset=spec.dataset,
                          write_disposition=spec.write_disposition, overridable=list(spec.overridable))
             for spec in services().registry]
    return ConnectorList(items=items).model_dump(mode="json")


@bp.get("/<connector_id>")
def get_connector(connector_id: str) -> dict[str, Any]:
    """One connector: its redacted spec (paths relative to the project), its schedule and its five latest runs."""
    svc = services()
    spec = get_connector_or_404(connector_id)
    latest = svc.store.list(target=connector_id, kind="connector", limit=5)
    return ConnectorDetail(id=spec.id, description=spec.description,
                           spec=shown_spec(spec.public_dict(), svc.settings.project_dir),
                           overridable=list(spec.overridable), schedule=schedule_out("connector", spec.id),
                           latest_runs=[run_out(run) for run in latest]).model_dump(mode="json")


@bp.get("/<connector_id>/stats")
def stats(connector_id: str) -> dict[str, Any]:
    """The connector's newest `window` runs as points to draw (duration, backend, rows per table, fire lag),
    oldest first, with their counts per status and success rate."""
    spec = get_connector_or_404(connector_id)
    window = query(StatsQuery).window
    points = services().store.history.recent("connector", spec.id, window)
    return ConnectorStats.of(spec.id, window, points).model_dump(mode="json")


@bp.post("/<connector_id>/preview")
@requires("read+trigger")  # it runs the source and answers its rows: reading source data needs `read` too
def preview(connector_id: str) -> dict[str, Any]:
    """Extract a few rows per resource with the connector's config, and tell which tables and columns would be new
    at the destination (and refused by the schema contract); nothing is loaded, no state changes."""
    spec = get_connector_or_404(connector_id)
    body = validated(PreviewRequest, json_object())
    settings = services().settings
    try:
        runnable = spec.with_params(body.params)
        with inline_slot("preview"):
            sample = preview_isolated(runnable, body.limit, services().workspace.outbound,
                                      settings.preview_timeout_seconds)
    except ParamsError as exc:
        raise ValidationFailed.of_field(exc.field, exc.message) from None
    except ConnectorRunError as exc:
        raise ValidationFailed(f"the connector's source failed: {exc.message}", code="preview_failed") from None
    except PreviewTimedOut as exc:
        raise GatewayTimeout(f"the preview was stopped: {exc} (FLOWGATE_PREVIEW_TIMEOUT_SECONDS)",
                             code="preview_timeout") from None
    try:
        changes, unavailable = preview_changes(runnable, services().workspace, sample["resources"]), None
    except DestinationBusy as exc:
        changes, unavailable = None, f"the destination is being written right now: {exc}"
    answer = PreviewOut(connector_id=spec.id, **sample, changes=changes, changes_unavailable=unavailable)
    return answer.model_dump()  # Python mode: the rows as Flask's JSON provider writes data (app.JSONProvider)


@bp.get("/<connector_id>/schema")
def schema(connector_id: str) -> dict[str, Any]:
    """The tables and columns (with types) the connector has loaded, read from its destination."""
    spec = get_connector_or_404(connector_id)
    svc = services()
    try:
        found = destination_schema(spec, svc.workspace)
    except DestinationBusy as exc:  # DuckDB's message names the file
        reason = without_project(str(exc), svc.settings.project_dir)
        raise Unavailable(f"the destination is being written right now: {reason}", code="destination_busy",
                          headers={"Retry-After": "5"}) from None
    if found["location"]:
        found["location"] = shown_path(found["location"], svc.settings.project_dir)
    return ConnectorSchema(connector_id=spec.id, dataset=spec.dataset, destination=spec.destination.kind,
                           **found).model_dump(mode="json")


def get_connector_or_404(connector_id: str) -> ConnectorSpec:
    """The configured connector, or a 404 problem."""
    spec = services().registry.get(connector_id)
    if spec is None:
        raise NotFound(f"no connector '{connector_id}'", code="connector_not_found")
    return spec
