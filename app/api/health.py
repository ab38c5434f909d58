"""Liveness (/health, never touches the database) and readiness (/api/v1/health/ready, checks everything)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from app import __version__, services

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> dict[str, Any]:
    """Answer at once: this process serves requests. Nothing here may block on the database or a pipeline."""
    return {"status": "healthy", "service": "flowgate", "version": __version__}


@bp.get("/api/v1/health/ready")
def ready() -> tuple[dict[str, Any], int]:
    """Database, executor capacity and Prefect, each with why it is or is not usable; 503 when not ready."""
    svc = services()
    checks: dict[str, dict[str, Any]] = {}
    try:
        checks["database"] = {"status": "up", "dialect": svc.store.engine.dialect.name,
                              "latency_ms": round(svc.store.ping(), 2)}
        counts = svc.store.count_by_status()
        capacity = svc.store.executors.capacity(stale_after_seconds=svc.settings.lease_seconds)
        checks["executor"] = {
            "status": "up" if capacity.slots else "down",
            "executors": capacity.executors, "capacity": capacity.slots,
            "active": counts.get("running", 0) + counts.get("cancelling", 0), "queued": counts.get("queued", 0),
            "this_process": {"slots": svc.executor.slots, "active": svc.executor.active,
                             "started": svc.executor.started},
        }
        if not capacity.slots:
            checks["executor"]["reason"] = "no local executor has a recent heartbeat; queued runs would wait"
    except Exception as exc:  # the reason is the answer here, not an error to raise
        checks["database"] = {"status": "down", "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        checks["executor"] = {"status": "unknown", "reason": "the run store is unreachable"}
    route = svc.dispatcher.prefect.route
    checks["prefect"] = route.status() if route else {
        "status": "disabled", "reason": "PREFECT_API_URL is not set; runs execute locally"}
    # Work can run if either path can take it; Prefect being down alone is no reason to refuse work.
    ready = checks["database"]["status"] == "up" and "up" in (checks["executor"]["status"], checks["prefect"]["status"])
    return {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
