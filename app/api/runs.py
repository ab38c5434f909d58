"""Runs: list, read and cancel, whichever process or backend runs them."""
from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, Response, jsonify, url_for

from app import services
from app.api.inputs import caller_name, check_json_size, idempotency_key, json_object, query, validated
from app.errors import Conflict, NotFound, Problem
from app.polls import with_hint
from app.runs.models import Run
from app.schemas import (
    RUN_ID_PATTERN,
    BulkRerunItem,
    BulkRerunOut,
    BulkRerunRequest,
    RerunRequest,
    RunJoined,
    RunLogLine,
    RunLogs,
    RunLogsQuery,
    RunOut,
    RunPage,
    RunQuery,
)
from connectors.secrets import public_error

bp = Blueprint("runs", __name__, url_prefix="/api/v1/runs")


def run_out(run: Run) -> RunOut:
    """A run as the API shows it (`unreadable` when its stored documents cannot be shown)."""
    return RunOut.shown(run, url_for("runs.get_run", run_id=run.id), services().settings.project_dir)


def run_document(run: Run) -> dict[str, Any]:
    """run_out as JSON."""
    return run_out(run).model_dump(mode="json")


def run_response(run: Run, status: int, joined: bool = False) -> Response:
    """A run document with its status code, a Location header pointing at it, and (not ended) Retry-After;
    `joined: true` in it when a trigger's conflict policy answered with it (RunJoined)."""
    shown = run_out(run)
    response = jsonify((RunJoined(**dict(shown), joined=True) if joined else shown).model_dump(mode="json"))
    response.status_code = status
    response.headers["Location"] = url_for("runs.get_run", run_id=run.id)
    return with_hint(response, run)


def get_run_or_404(run_id: str) -> Run:
    """The run, its Prefect state brought up to date, or a 404 problem."""
    run = services().store.get(run_id) if re.fullmatch(RUN_ID_PATTERN, run_id) else None
    if run is None:
        raise NotFound(f"no run '{run_id}'", code="run_not_found")
    return services().dispatcher.refresh(run)


@bp.get("")
def list_runs() -> dict[str, Any]:
    """Runs newest first, filtered by connector (or workflow), status, backend, source and labels (all of those
    given), a page at a time."""
    args = query(RunQuery)
    runs = services().store.list(target=args.connector_id, status=args.status, backend=args.backend,
                                 source=args.source, limit=args.limit + 1, labels=_labels(args.label),
                                 before=_decode_cursor(args.cursor) if args.cursor else None)
    page, more = runs[: args.limit], len(runs) > args.limit
    return RunPage(items=[run_out(run) for run in page],
                   next_cursor=_encode_cursor(page[-1]) if more else None).model_dump(mode="json")


@bp.get("/<run_id:run_id>")
def get_run(run_id: str) -> Response:
    """One run: status, backend, timings, result or error; Retry-After while it has not ended."""
    run = get_run_or_404(run_id)
    return with_hint(jsonify(run_document(run)), run)


@bp.get("/<run_id>/logs")
def get_run_logs(run_id: str) -> dict[str, Any]:
    """The run's log lines, oldest first, a page at a time."""
    args = query(RunLogsQuery)
    run = get_run_or_404(run_id)
    page = services().dispatcher.backend_for(run).logs(run, args.after, args.limit)
    items = [RunLogLine.model_validate({**item, "message": public_error(item["message"])}) for item in page.items]
    answer = RunLogs(run_id=run.id, source=page.source, items=items, next_after=page.next_after)
    return answer.model_dump()  # Python mode: each time as Flask's JSON provider writes it (app.JSONProvider)


@bp.post("/rerun")
def rerun_runs() -> dict[str, Any]:
    """Rerun the ended runs a filter matches, newest first, each at most once however often asked (dry_run: list)."""
    body = validated(BulkRerunRequest, json_object())
    where = body.filter
    kind = "connector" if where.connector_id else "workflow" if where.workflow_id else None
    # Both: runs of a connector and of a workflow at once, which no run is (each condition narrows the match).
    matched = [] if where.connector_id and where.workflow_id else services().store.list(
        target=where.connector_id or where.workflow_id, kind=kind, status=where.status, backend=where.backend,
        labels=_labels(where.label or ()), limit=body.limit + 1)
    done = services().dispatcher.rerun_many(matched[: body.limit], body.dry_run, triggered_by=caller_name())
    items = [BulkRerunItem(run_id=source.id, kind=source.kind, target=source.target, status=source.status,
                           rerun_run_id=rerun.id if isinstance(rerun, Run) else None, created=created,
                           error={"code": rerun.code, "detail": rerun.detail} if isinstance(rerun, Problem) else None)
             for source, rerun, created in done]
    return BulkRerunOut(dry_run=body.dry_run, items=items, more=len(matched) > body.limit).model_dump(mode="json")


@bp.post("/<run_id>/rerun")
def rerun_run(run_id: str) -> Response:
    """A new run of what this ended run ran (`source: rerun`); a workflow from its failed nodes with `from`."""
    body = validated(RerunRequest, json_object())
    for field in ("params", "inputs"):
        check_json_size(field, getattr(body, field), services().settings.max_params_bytes)
    source = get_run_or_404(run_id)
    run, _ = services().dispatcher.rerun(source, body.params, body.inputs, body.from_ == "failed", idempotency_key(),
                                         triggered_by=caller_name())
    return run_response(run, 200 if run.is_terminal else 202)


@bp.post("/<run_id>/cancel")
def cancel_run(run_id: str) -> Response:
    """Cancel: a queued run at once (200), a running one at its next checkpoint (202, `cancelling`)."""
    get_run_or_404(run_id)
    run = services().dispatcher.cancel(run_id) or get_run_or_404(run_id)  # None: pruned meanwhile (404)
    if run.is_terminal and run.status != "cancelled":
        raise Conflict(f"run '{run_id}' already ended as {run.status}", code="run_already_ended", run_status=run.status)
    return run_response(run, 200 if run.is_terminal else 202)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# A cursor is "<created_at in microseconds since the epoch>.<run id>": every string of the documented pattern
# (app.schemas.CURSOR_PATTERN) decodes to a position, so the document says exactly which cursors are accepted.
def _encode_cursor(run: Run) -> str:
    return f"{(run.created_at - _EPOCH) // timedelta(microseconds=1)}.{run.id}"


def _labels(texts: Sequence[str]) -> list[tuple[str, str]]:
    """Each `key:value` (app.schemas.LABEL_QUERY_PATTERN) as (key, value)."""
    return [(key, value) for key, _, value in (text.partition(":") for text in texts)]


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    micros, run_id = cursor.split(".")
    return _EPOCH + timedelta(microseconds=int(micros)), run_id
