"""HTTP API: one blueprint per resource."""
from __future__ import annotations

from flask import Flask
from werkzeug.routing import BaseConverter


class RunIdConverter(BaseConverter):
    """A run id in GET /api/v1/runs/<run_id>: any segment but `rerun`, the path of the bulk rerun, so that another
    method there is a 405 allowing POST only (ids that are no run stay the view's 404)."""

    regex = r"(?!rerun$)[^/]+"


def init_app(app: Flask) -> None:
    """Register every blueprint (the dashboard's under /ui/), and conditional GETs for what they answer."""
    from app import etags
    from app.api import connectors, health, runs, schedules, triggers, ui, whoami, workflows

    app.url_map.converters["run_id"] = RunIdConverter

    for module in (health, triggers, runs, connectors, workflows, schedules, whoami, ui):
        app.register_blueprint(module.bp)
    app.register_blueprint(workflows.catalog)
    etags.init_app(app)
