"""Triggers: POST /trigger (the existing callers' contract) and POST /api/v1/connectors/<id>/runs."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify, url_for

from app import services
from app.api.inputs import (
    caller_name,
    check_json_size,
    checked_callback_url,
    idempotency_key,
    json_object,
    preferred_wait,
    validated,
)
from app.api.runs import run_response
from app.dispatch import Skipped
from app.errors import ValidationFailed
from app.schemas import RunOptions, TriggerRequest, TriggerSkipped
from app.waits import wait_for_end

bp = Blueprint("triggers", __name__)


@bp.post("/trigger")
def trigger() -> Response:
    """Run a connector: 202 with the queued run at once, or 200 with the finished run when `wait` allows."""
    body = validated(TriggerRequest, json_object())
    return _start(body.connector_id, body)


@bp.post("/api/v1/connectors/<connector_id>/runs")
def create_connector_run(connector_id: str) -> Response:
    """The same as /trigger, with the connector in the path."""
    return _start(connector_id, validated(RunOptions, json_object()))


def _start(connector_id: str, options: RunOptions) -> Response:
    svc = services()
    if options.wait > svc.settings.max_wait_seconds:
        raise ValidationFailed.of_field("wait", f"must be at most {svc.settings.max_wait_seconds:g} seconds")
    wait, applied = preferred_wait(options.wait, svc.settings.max_wait_seconds)
    check_json_size("params", options.params, svc.settings.max_params_bytes)
    key = idempotency_key(options.idempotency_key)
    callback_url = checked_callback_url(options.callback_url)
    try:
        run, _, joined = svc.dispatcher.trigger_connector(
            connector_id, options.params, options.backend, key, callback_url, retry=options.retry,
            on_conflict=options.on_conflict, labels=options.labels, triggered_by=caller_name())
    except Skipped as skipped:
        answer = TriggerSkipped(skipped="already_active", detail=f"nothing was started: {skipped}",
                                active_run_id=skipped.run_id,
                                active_run_url=url_for("runs.get_run", run_id=skipped.run_id))
        return jsonify(answer.model_dump(mode="json"))
    run, applied = wait_for_end(run, wait, applied)
    # A joined run is an answer, not an acceptance: 200 whatever its status (issue 28)
    response = run_response(run, 200 if run.is_terminal or joined else 202, joined=joined)
    if applied:
        response.headers["Preference-Applied"] = applied
    return response
