"""Runs: list, read and cancel, whichever process or backend runs them."""
from __future__ import annotations

import base64
import binascii
import logging
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify, url_for

from app import services
from app.api.inputs import query
from app.errors import Conflict, NotFound, ValidationFailed
from app.runs.models import Run
from app.schemas import RunLogsQuery, RunOut, RunQuery
from connectors.secrets import public_error

bp = Blueprint("runs", __name__, url_prefix="/api/v1/runs")


def run_document(run: Run) -> dict[str, Any]:
    """A run as the API shows it."""
    return RunOut.from_run(run, url_for("runs.get_run", run_id=run.id)).model_dump(mode="json")


def run_response(run: Run, status: int) -> Response:
    """A run document with its status code and a Location header pointing at it."""
    response = jsonify(run_document(run))
    response.status_code = status
    response.headers["Location"] = url_for("runs.get_run", run_id=run.id)
    return response


def get_run_or_404(run_id: str) -> Run:
    """The run, its Prefect state brought up to date, or a 404 problem."""
    run = services().store.get(run_id)
    if run is None:
        raise NotFound(f"no run '{run_id}'", code="run_not_found")
    return services().dispatcher.refresh(run)


@bp.get("")
def list_runs() -> dict[str, Any]:
    """Runs newest first, filtered by connector and status, a page at a time."""
    args = query(RunQuery)
    runs = services().store.list(target=args.connector_id, status=args.status, limit=args.limit + 1,
                                 before=_decode_cursor(args.cursor) if args.cursor else None)
    page, more = runs[: args.limit], len(runs) > args.limit
    return {"items": [run_document(run) for run in page],
            "next_cursor": _encode_cursor(page[-1]) if more else None}


@bp.get("/<run_id>")
def get_run(run_id: str) -> dict[str, Any]:
    """One run: status, backend, timings, result or error."""
    return run_document(get_run_or_404(run_id))


@bp.get("/<run_id>/logs")
def get_run_logs(run_id: str) -> dict[str, Any]:
    """The run's log lines, oldest first, a page at a time."""
    args = query(RunLogsQuery)
    run = get_run_or_404(run_id)
    svc = services()
    if run.backend == "prefect" and run.prefect_flow_run_id:
        lines = svc.dispatcher.prefect_logs(run, args.after, args.limit)
        items = [{"at": line["timestamp"], "level": logging.getLevelName(line.get("level", 20)),
                  "logger": line.get("name") or "", "message": public_error(line.get("message") or "")}
                 for line in lines]
        following = args.after + len(items)
        return {"run_id": run.id, "source": "prefect", "items": items,
                "next_after": following if len(items) == args.limit else None}
    lines = svc.store.logs(run.id, after=args.after, limit=args.limit)
    return {"run_id": run.id, "source": "flowgate",
            "items": [{k: public_error(v) if k == "message" else v for k, v in line.items() if k != "id"}
                      for line in lines],
            "next_after": lines[-1]["id"] if len(lines) == args.limit else None}


@bp.post("/<run_id>/cancel")
def cancel_run(run_id: str) -> Response:
    """Cancel: a queued run at once (200), a running one at its next checkpoint (202, `cancelling`)."""
    get_run_or_404(run_id)
    run = services().dispatcher.cancel(run_id)
    if run.is_terminal and run.status != "cancelled":
        raise Conflict(f"run '{run_id}' already ended as {run.status}", code="run_already_ended", run_status=run.status)
    return run_response(run, 200 if run.is_terminal else 202)


def _encode_cursor(run: Run) -> str:
    return base64.urlsafe_b64encode(f"{run.created_at.isoformat()}|{run.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, run_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        return datetime.fromisoformat(created_at), run_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed.of_field("cursor", "not a cursor returned as next_cursor") from None
