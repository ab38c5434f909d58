"""Schedules: a connector's or workflow's schedule as shown on it, and pause / resume (admin scope), kept in the
run store so every gateway sees them and a restart keeps them."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g

from app import services
from app.api.runs import run_out
from app.auth import requires
from app.errors import Conflict, NotFound
from app.runs.models import utcnow
from app.scheduler import Schedule
from app.schemas import ScheduleOut

bp = Blueprint("schedules", __name__)


def schedule_out(kind: str, target: str) -> ScheduleOut | None:
    """The schedule of a connector or workflow with its state, next fire times and last run; None without one."""
    schedule = services().scheduler.get(kind, target)
    return _schedule_out(kind, target, schedule) if schedule is not None else None


def _schedule_out(kind: str, target: str, schedule: Schedule) -> ScheduleOut:
    svc = services()
    state = svc.store.schedules.get(kind, target)
    paused = bool(state and state.paused)
    last = svc.store.schedules.last_run(kind, target)
    spec = schedule.spec
    return ScheduleOut(
        **spec.model_dump(include={"cron", "interval", "rrule", "timezone", "catch_up", "max_catch_up"}),
        state="inactive" if not spec.active else "paused" if paused else "active",
        paused_at=state.paused_at if state else None, paused_by=state.paused_by if state else None,
        next_fire_times=svc.scheduler.upcoming(schedule) if spec.active and not paused else [],
        missed_slots=state.missed if state else 0, skipped_slots=state.skipped if state else 0,
        last_skipped_for=state.last_skipped_for if state else None,
        last_run=run_out(last) if last else None,
    )


@bp.post("/api/v1/connectors/<connector_id>/schedule/pause")
@requires("admin")
def pause_connector(connector_id: str) -> dict[str, Any]:
    """Fire none of the connector's slots until resumed."""
    return _set_paused("connector", connector_id, True)


@bp.post("/api/v1/connectors/<connector_id>/schedule/resume")
@requires("admin")
def resume_connector(connector_id: str) -> dict[str, Any]:
    """Fire the connector's slots again, from now on."""
    return _set_paused("connector", connector_id, False)


@bp.post("/api/v1/workflows/<workflow_id>/schedule/pause")
@requires("admin")
def pause_workflow(workflow_id: str) -> dict[str, Any]:
    """Fire none of the workflow's slots until resumed."""
    return _set_paused("workflow", workflow_id, True)


@bp.post("/api/v1/workflows/<workflow_id>/schedule/resume")
@requires("admin")
def resume_workflow(workflow_id: str) -> dict[str, Any]:
    """Fire the workflow's slots again, from now on."""
    return _set_paused("workflow", workflow_id, False)


def _set_paused(kind: str, target: str, paused: bool) -> dict[str, Any]:
    svc = services()
    known = svc.registry.get(target) if kind == "connector" else svc.workflows.get(target)
    if known is None:
        raise NotFound(f"no {kind} '{target}'", code=f"{kind}_not_found")
    schedule = svc.scheduler.get(kind, target)
    if schedule is None:
        raise NotFound(f"{kind} '{target}' has no schedule", code="schedule_not_found")
    if not schedule.spec.active:
        raise Conflict(f"the schedule of {kind} '{target}' says `active: false`; change the YAML to fire it",
                       code="schedule_inactive")
    if paused:
        key = getattr(g, "api_key", None)
        svc.store.schedules.pause(kind, target, by=key.name if key else None)
    else:
        svc.store.schedules.resume(kind, target, utcnow())
    svc.scheduler.wake()  # this process's next pass comes now; the others see it within a second
    return _schedule_out(kind, target, schedule).model_dump(mode="json")
