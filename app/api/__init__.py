"""HTTP API: one blueprint per resource."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register every blueprint (the dashboard's under /ui/), and conditional GETs for what they answer."""
    from app import etags
    from app.api import connectors, health, runs, schedules, triggers, ui, whoami, workflows

    for module in (health, triggers, runs, connectors, workflows, schedules, whoami, ui):
        app.register_blueprint(module.bp)
    app.register_blueprint(workflows.catalog)
    etags.init_app(app)
