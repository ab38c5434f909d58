"""Liveness (/health, never touches the database) and readiness (/api/v1/health/ready, checks everything)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from app import __version__, services
from app.schemas import Health, Readiness

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> dict[str, Any]:
    """Answer at once: this process serves requests. Nothing here may block on the database or a pipeline."""
    return Health(status="healthy", service="flowgate", version=__version__).model_dump(mode="json")


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
    checks["process"] = _background_loops(svc)
    route = svc.dispatcher.prefect.route
    checks["prefect"] = {**route.status(), **svc.prefect_sync.awaiting_pickup(),
                         **svc.prefect_sync.run_store_warning()} if route else {
        "status": "disabled", "reason": "PREFECT_API_URL is not set; runs execute locally"}
    # Work can run if either path can take it; Prefect being down alone is no reason to refuse work.
    ready = (checks["database"]["status"] == "up" and checks["process"]["status"] == "up"
             and "up" in (checks["executor"]["status"], checks["prefect"]["status"]))
    answer = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return answer.model_dump(mode="json"), 200 if ready else 503


def _background_loops(svc: Any) -> dict[str, Any]:
    """This process's background loops (started after gunicorn forks): a dead one means this process is broken."""
    executor = svc.executor
    loops = {**executor.loops(), **{loop.name: loop.alive for loop in svc.loops}}
    stopping = executor.slots and executor.loops() and not executor.started  # draining: loops wind down on purpose
    started = {name: alive for name, alive in loops.items() if alive is not None}
    dead = sorted(name for name, alive in started.items() if not alive)
    if dead and not stopping:
        return {"status": "down", "loops": started, "reason": f"background loop(s) stopped: {', '.join(dead)}"}
    return {"status": "up", "loops": started}
