"""Connectors: what can be run, as declared in connectors.yaml (secrets redacted), with latest runs."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from app import services
from app.api.runs import run_document
from app.errors import NotFound
from app.schemas import ConnectorOut

bp = Blueprint("connectors", __name__, url_prefix="/api/v1/connectors")


@bp.get("")
def list_connectors() -> dict[str, Any]:
    """Every configured connector, in file order."""
    return {"items": [ConnectorOut(id=spec.id, description=spec.description, source_kind=spec.source.kind,
                                   destination_kind=spec.destination.kind, dataset=spec.dataset,
                                   write_disposition=spec.write_disposition,
                                   overridable=list(spec.source.overridable)).model_dump()
                      for spec in services().registry]}


@bp.get("/<connector_id>")
def get_connector(connector_id: str) -> dict[str, Any]:
    """One connector: its redacted spec and its five latest runs."""
    svc = services()
    spec = svc.registry.get(connector_id)
    if spec is None:
        raise NotFound(f"no connector '{connector_id}'", code="connector_not_found")
    latest = svc.store.list(target=connector_id, limit=5)
    return {"id": spec.id, "description": spec.description, "spec": spec.public_dict(),
            "overridable": list(spec.source.overridable), "latest_runs": [run_document(run) for run in latest]}
