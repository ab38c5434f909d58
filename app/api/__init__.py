"""HTTP API: one blueprint per resource."""
from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    """Register every blueprint."""
    from app.api import connectors, health, runs, triggers, workflows

    for module in (health, triggers, runs, connectors, workflows):
        app.register_blueprint(module.bp)
