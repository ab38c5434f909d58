"""Workflows: the files as configured (graph, inputs, latest runs), execute (the seed's contract), follow an
execution node by node, run one node by itself."""
from __future__ import annotations

import re
from typing import Any, NoReturn

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
from app.api.runs import run_out
from app.api.schedules import schedule_out
from app.auth import requires
from app.backends.workflow_runs import pending_nodes, stored_spec
from app.dispatch import Skipped
from app.errors import NotFound, ValidationFailed
from app.polls import with_hint
from app.runs.models import Run
from app.schemas import (
    RUN_ID_PATTERN,
    ExecuteNodeRequest,
    NodeExecutionOut,
    NodeRunOut,
    WorkflowAccepted,
    WorkflowDetail,
    WorkflowExecuteRequest,
    WorkflowExecution,
    WorkflowGraph,
    WorkflowJoined,
    WorkflowList,
    WorkflowOut,
    WorkflowSkipped,
)
from app.waits import inline_slot, wait_for_end
from connectors.nesting import NestedTooDeep, check_depth
from connectors.secrets import public_error, scrub
from flows.engine import COMPLETED
from flows.workflow_registry import WorkflowError, node_problems, parse_workflow
from flows.workflow_spec import NodeSpec, WorkflowSpec

bp = Blueprint("workflows", __name__, url_prefix="/api/workflow")
# The workflow files as configured, beside the seed's execute contract above.
catalog = Blueprint("workflow_catalog", __name__, url_prefix="/api/v1/workflows")


@catalog.get("")
def list_workflows() -> dict[str, Any]:
    """Every workflow file, by id."""
    items = [WorkflowOut(id=spec.id, description=spec.description, nodes=len(spec.nodes),
                         scheduled=spec.schedule is not None) for spec in services().workflows]
    return WorkflowList(items=items).model_dump(mode="json")


@catalog.get("/<workflow_id>")
def get_workflow(workflow_id: str) -> dict[str, Any]:
    """One workflow file: its graph and layers, its inputs, its schedule and its five latest runs."""
    svc = services()
    spec = svc.workflows.get(workflow_id)
    if spec is None:
        raise NotFound(f"no workflow '{workflow_id}'", code="workflow_not_found")
    latest = svc.store.list(target=workflow_id, kind="workflow", limit=5)
    graph = WorkflowGraph(
        nodes=[{"id": node.id, "type": node.type, "name": node.name} for node in spec.nodes],
        connections=[{"from": edge.source, "to": edge.target, "branch": edge.branch} for edge in spec.connections])
    return WorkflowDetail(id=spec.id, description=spec.description, layers=spec.layers(), graph=graph,
                          inputs=scrub(spec.declared_inputs()), schedule=schedule_out("workflow", spec.id),
                          latest_runs=[run_out(run) for run in latest]).model_dump(mode="json")


@bp.post("/<workflow_id>/execute")
def execute(workflow_id: str) -> Response:
    """Start an execution: 202 with its id at once (200 when it ended within `wait`); its conflict policy may join
    an active one, skip (200 naming it) or reject (409)."""
    svc = services()
    body = validated(WorkflowExecuteRequest, json_object())
    if body.wait > svc.settings.max_wait_seconds:
        raise ValidationFailed.of_field("wait", f"must be at most {svc.settings.max_wait_seconds:g} seconds")
    wait, applied = preferred_wait(body.wait, svc.settings.max_wait_seconds)
    check_json_size("inputs", body.inputs, svc.settings.max_params_bytes)
    spec = _workflow(workflow_id, body.workflow)
    key = idempotency_key()
    callback_url = checked_callback_url(body.callback_url)
    try:
        run, created, joined = svc.dispatcher.trigger_workflow(
            spec, body.inputs, body.mode, body.backend, key, callback_url,
            file_definition=svc.workflows.definition(spec.id) if body.workflow is None else None, retry=body.retry,
            on_conflict=body.on_conflict, labels=body.labels, triggered_by=caller_name())
    except Skipped as skipped:
        answer = WorkflowSkipped(success=True, skipped="already_active", message=f"nothing was started: {skipped}",
                                 activeExecutionId=skipped.run_id,
                                 statusUrl=url_for("workflows.get_execution", execution_id=skipped.run_id))
        return jsonify(answer.model_dump(mode="json"))
    run, applied = wait_for_end(run, wait, applied)
    status_url = url_for("workflows.get_execution", execution_id=run.id)
    message = (f"Joined the active execution of workflow '{spec.id}' ({run.backend})" if joined else
               f"Workflow execution {'started' if created else 'already accepted'} in background "
               f"({run.backend}, {body.mode} mode)")
    accepted = WorkflowAccepted(success=True, executionId=run.id, status=run.status, message=message,
                                backend=run.backend, statusUrl=status_url)
    response = jsonify((WorkflowJoined(**dict(accepted), joined=True) if joined else accepted).model_dump(mode="json"))
    response.status_code = 200 if run.is_terminal or joined else 202  # a joined execution is an answer (issue 28)
    response.headers["Location"] = status_url
    if applied:
        response.headers["Preference-Applied"] = applied
    return with_hint(response, run)


@bp.get("/execution/<execution_id>")
def get_execution(execution_id: str) -> Response:
    """The execution's status and every node's status, timing, attempts and output."""
    svc = services()
    run = svc.store.get(execution_id) if re.fullmatch(RUN_ID_PATTERN, execution_id) else None
    if run is None or run.kind != "workflow":
        raise NotFound(f"no workflow execution '{execution_id}'", code="execution_not_found")
    run = svc.dispatcher.refresh(run)
    try:
        nodes = svc.store.nodes.read(run.id) or pending_nodes(stored_spec(run))
        nodes = svc.dispatcher.backend_for(run).live_nodes(run, nodes)
        execution = execution_out(run, nodes)
    except (NestedTooDeep, RecursionError) as exc:
        execution = unreadable_execution_out(run, exc)
    # Python mode: the times and node outputs as Flask's JSON provider writes them (app.JSONProvider), as ever.
    return with_hint(jsonify(execution.model_dump()), run)


@bp.post("/<workflow_id>/execute-node")
@requires("read+trigger")  # it runs a node and answers its output (an http node's body): `read` too
def execute_node(workflow_id: str) -> dict[str, Any]:
    """Run one node now with `inputData` and answer with its output (nothing is cached or retried)."""
    svc = services()
    body = validated(ExecuteNodeRequest, json_object())
    node_data = {"id": body.nodeId, "type": body.nodeType, **body.node}
    for field in ("id", "type"):
        expected = body.nodeId if field == "id" else body.nodeType
        if node_data[field] != expected:
            raise ValidationFailed.of_field(f"node.{field}", f"must match {'nodeId' if field == 'id' else 'nodeType'}")
    node = validated(NodeSpec, node_data, prefix="node.")
    check_json_size("inputData", body.inputData, svc.settings.max_params_bytes)
    problems = node_problems(node, [spec.id for spec in svc.registry])
    if problems:
        raise ValidationFailed(f"invalid node: {', '.join(f'node.{f}' for f, _ in problems)}",
                               errors=[{"field": f"node.{f}", "message": m} for f, m in problems])
    limit = svc.settings.max_node_wait_seconds
    if node.timeout > limit:
        raise ValidationFailed.of_field("node.timeout", f"must be at most {limit:g} seconds for execute-node")
    with inline_slot("execute-node"):
        result = svc.engine.run_node(node, body.inputData)
    ok = result.status == COMPLETED
    answer = NodeRunOut(success=ok, nodeId=node.id, output=scrub(result.output) if ok else None,
                        error=None if ok else public_error(result.error), mode="local",
                        durationSeconds=result.duration_seconds)
    return answer.model_dump()  # Python mode: the output as Flask's JSON provider writes it (app.JSONProvider)


def _workflow(workflow_id: str, inline: dict[str, Any] | None) -> WorkflowSpec:
    svc = services()
    if inline is None:
        spec = svc.workflows.get(workflow_id)
        if spec is None:
            raise NotFound(f"no workflow '{workflow_id}' (give a definition in `workflow` to run one inline)",
                           code="workflow_not_found")
        return spec
    declared = [key for key in ("schedule", "callback_url") if key in inline]
    if declared:  # a scheduled run's settings: only a workflow file's schedule fires
        raise ValidationFailed(f"invalid workflow: workflow.{declared[0]}: only a workflow file may declare it",
                               code="invalid_workflow", errors=[
                                   {"field": f"workflow.{key}", "message": "only a workflow file may declare it"}
                                   for key in declared])
    try:
        spec = parse_workflow(inline, workflow_id, [connector.id for connector in svc.registry])
    except WorkflowError as exc:
        errors = [{"field": f"workflow.{e['field']}", "message": e["message"]} for e in exc.errors]
        raise ValidationFailed(f"invalid workflow: {'; '.join(e['field'] + ': ' + e['message'] for e in errors)}",
                               code="invalid_workflow", errors=errors) from None
    # An inline run under a configured id would pass for that one's runs, metrics and signed callbacks.
    if svc.workflows.get(workflow_id) is not None or svc.registry.get(workflow_id) is not None:
        _invalid_workflow("workflow_id", f"'{workflow_id}' is a configured workflow or connector: an inline "
                                         "definition needs an id of its own")
    if "id" in inline and inline["id"] != workflow_id:
        _invalid_workflow("workflow.id", f"must be the path's workflow id '{workflow_id}', or left out")
    return spec


def _invalid_workflow(field: str, message: str) -> NoReturn:
    raise ValidationFailed(f"invalid workflow: {field}: {message}", code="invalid_workflow",
                           errors=[{"field": field, "message": message}])


def execution_out(run: Run, nodes: list[dict[str, Any]]) -> WorkflowExecution:
    """A workflow run as GET /api/workflow/execution/<id> shows it (NestedTooDeep when its stored documents nest
    deeper than can be shown)."""
    result = run.result or {}
    for document in (result, run.error, nodes):
        check_depth(document)  # scrub walks nothing while no secret is known
    return WorkflowExecution(
        **_execution_columns(run), layers=result.get("layers") or stored_spec(run).layers(),
        outputs=scrub(result.get("outputs") or {}), error=public_error(run.error),
        nodes=[NodeExecutionOut.model_validate({**scrub(node), "error": public_error(node.get("error"))})
               for node in nodes])


def unreadable_execution_out(run: Run, reason: Exception) -> WorkflowExecution:
    """What can be shown of a workflow run whose stored documents cannot be: its columns, no nodes or outputs."""
    return WorkflowExecution(**_execution_columns(run), layers=[], outputs={}, nodes=[], unreadable=True,
                             error={"code": "unreadable_run", "message": f"the stored run cannot be shown: {reason}"})


def _execution_columns(run: Run) -> dict[str, Any]:
    duration = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else None
    return {"success": run.status not in ("failed", "crashed"), "executionId": run.id, "workflowId": run.target,
            "status": run.status, "mode": (run.params or {}).get("mode", "optimized"), "backend": run.backend,
            "fallbackReason": run.fallback_reason, "prefectFlowRunId": run.prefect_flow_run_id,
            "createdAt": run.created_at, "startedAt": run.started_at, "finishedAt": run.finished_at,
            "durationSeconds": duration}
