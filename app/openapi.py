"""The OpenAPI 3.1 document of the HTTP API, built from the same pydantic models the views validate with.
Over 300 lines because every path of the API is described in the one table of build_document."""
from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app import __version__
from app.schemas import (
    RUN_ID_PATTERN,
    BulkRerunOut,
    BulkRerunRequest,
    ConnectorDetail,
    ConnectorList,
    ConnectorSchema,
    ConnectorStats,
    ExecuteNodeRequest,
    Health,
    LoadResult,
    NodeRunOut,
    PreviewOut,
    PreviewRequest,
    ProblemDetail,
    Readiness,
    RerunRequest,
    RunJoined,
    RunLogs,
    RunLogsQuery,
    RunOptions,
    RunOut,
    RunPage,
    RunQuery,
    ScheduleOut,
    StatsQuery,
    TriggerRequest,
    TriggerSkipped,
    WhoAmI,
    WorkflowAccepted,
    WorkflowDetail,
    WorkflowExecuteRequest,
    WorkflowExecution,
    WorkflowJoined,
    WorkflowList,
    WorkflowSkipped,
)
from connectors.spec import CONNECTOR_ID, ConnectorSpec, PythonSource, SqlDatabaseSource
from flows.workflow_spec import NODE_ID

_MODELS: list[type[BaseModel]] = [TriggerRequest, RunOptions, RunOut, RunPage, ConnectorList, ConnectorDetail,
                                  Health, Readiness, ProblemDetail, PreviewRequest, PreviewOut,
                                  ConnectorSchema, WorkflowExecuteRequest, WorkflowAccepted, WorkflowExecution,
                                  ExecuteNodeRequest, NodeRunOut, RunLogs, WhoAmI, ScheduleOut, WorkflowList,
                                  WorkflowDetail, LoadResult, ConnectorStats, TriggerSkipped, RerunRequest,
                                  BulkRerunRequest, BulkRerunOut, WorkflowSkipped,
                                  RunJoined, WorkflowJoined]
_PROBLEMS = {"400": "Malformed JSON or a body that is not an object", "401": "No valid API key (when keys are set)",
             "403": "The API key lacks the scope", "404": "Unknown resource",
             "405": "Method not allowed",
             "409": "Conflict with the state of things; `code` says which (idempotency_key_reused, run_in_progress "
                    "with the active run's `run_id` (`on_conflict: reject`), run_already_ended, run_not_ended, "
                    "run_not_failed)",
             "413": "Body too large", "415": "A body whose Content-Type is not application/json",
             "421": "A Host this gateway does not answer to (without API keys: loopback names, IP addresses and "
                    "FLOWGATE_SERVER_NAMES)",
             "422": "A field is missing, mistyped or unknown",
             "429": "Too many requests: the caller's rate limit, too many wrong API keys from this address, or "
                    "(execute-node, preview) every inline slot of the process taken (inline_slots_full)",
             "504": "The preview's source gave no sample within FLOWGATE_PREVIEW_TIMEOUT_SECONDS (preview_timeout)"}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _problems(*statuses: str) -> dict[str, Any]:
    return {status: {"description": _PROBLEMS.get(status, "Problem"),
                     "content": {"application/problem+json": {"schema": _ref(ProblemDetail)}}}
            for status in statuses}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": False, "content": {"application/json": {"schema": _ref(model)}}}


def _path_param(name: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


_IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": TriggerRequest.model_json_schema()["properties"]["idempotency_key"]["anyOf"][0]}
_RUN_ID = {"pattern": RUN_ID_PATTERN}


_RETRY_AFTER = {"Retry-After": {
    "description": "While the run has not ended: seconds until it is worth asking again, from its connector's or "
                   "workflow's recent durations (absent once it has ended)",
    "schema": {"type": "string", "pattern": "^([1-9]|[12][0-9]|30)$"}}}


def _polled(response: dict[str, Any]) -> dict[str, Any]:
    """A response that carries Retry-After while its run has not ended."""
    return {**response, "headers": _RETRY_AFTER}


def _run_started(*problems: str) -> dict[str, Any]:
    # anyOf, not oneOf: a RunJoined is a RunOut with one field more, so it matches both
    answered = {"anyOf": [_ref(RunOut), _ref(RunJoined), _ref(TriggerSkipped)]}
    return {"200": _polled({"description": "The run ended within `wait`; or the conflict policy answered: with "
                                           "`on_conflict: join` (or `queue_one` finding one queued) the active "
                                           "run, `joined: true` (RunJoined, perhaps not ended); with `skip`, "
                                           "nothing was started (TriggerSkipped)",
                            "content": {"application/json": {"schema": answered}}}),
            "202": _polled(_json(RunOut, "The run is queued or running; poll status_url")),
            **_problems("400", "404", "409", "413", "422", "503", *problems)}


def _schedule_switch(kind: str, parameter: dict[str, Any], paused: bool) -> dict[str, Any]:
    verb = "pause" if paused else "resume"
    return {"post": {
        "operationId": f"{verb}{kind.capitalize()}Schedule",
        "summary": (f"Fire none of the {kind}'s slots until resumed (admin scope); kept in the run store"
                    if paused else f"Fire the {kind}'s slots again from now on (admin scope); paused slots never run"),
        "parameters": [parameter],
        "responses": {"200": _json(ScheduleOut, "The schedule as it is now"),
                      "404": {**_problems("404")["404"], "description": f"Unknown {kind}, or it has no schedule"},
                      "409": {**_problems("409")["409"], "description": "The schedule says `active: false`"}}}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": _not_null(prop)}
            for name, prop in copy.deepcopy(_properties(model)).items()]


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schemas of `model`'s fields, made once per process (callers change copies): each app a test or a
    gunicorn worker builds asks for them again, and a model's schema costs milliseconds."""
    return model.model_json_schema(by_alias=True)["properties"]


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    # A query parameter is present or absent, never null: `X | None = None` documents as X.
    branches = [branch for branch in prop.get("anyOf", ()) if branch != {"type": "null"}]
    if len(branches) != 1:
        return prop
    return {**branches[0], **{k: v for k, v in prop.items() if k not in ("anyOf", "default")}}


_JSON_TYPES = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"))


def params_schema(spec: ConnectorSpec) -> dict[str, Any]:
    """What a trigger's `params` may hold for this connector, as ConnectorSpec.with_params checks it.

    Source fields come from the source model's own schema; a python source's args take the JSON type of their
    declared value (or null, which with_params lets through); `full_refresh` is a boolean where the connector
    allows it (`allow_full_refresh`).
    """
    properties: dict[str, Any] = {}
    if isinstance(spec.source, PythonSource):
        for key, declared in spec.source.args.items():
            kind = next((name for types, name in _JSON_TYPES if isinstance(declared, types)), None)
            properties[key] = {"type": [kind, "null"]} if kind and declared is not None else {}
            bound = (spec.source.bounds or {}).get(key)
            if bound is not None:  # the declared bounds (connectors.yaml `bounds:`), as with_params checks them
                properties[key].update({name: value for name, value in (
                    ("minimum", bound.minimum), ("maximum", bound.maximum),
                    ("maxLength" if kind == "string" else "maxItems", bound.max_length)) if value is not None})
    else:
        fields = _properties(type(spec.source))
        for key in (key for key in spec.source.overridable if key in spec.overridable):
            properties[key] = {} if key == "initial_value" else {
                k: copy.deepcopy(v) for k, v in fields[key].items() if k not in ("default", "title")}
        if isinstance(spec.source, SqlDatabaseSource) and spec.source.tables:
            # a declared table list is the set a trigger may choose from
            properties["tables"] = {"type": ["array", "null"], "minItems": 1,
                                    "items": {"enum": list(spec.source.tables)}}
    if "full_refresh" in spec.overridable:
        properties["full_refresh"] = {"type": "boolean", "description": "Drop the tables and incremental state first."}
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "description": f"Overrides {spec.id} allows: {', '.join(spec.overridable)}."}


def _params_of_any(connectors: Sequence[ConnectorSpec]) -> dict[str, Any]:
    # With the connector in the path, the schema can only say which keys some connector takes; the rule is below.
    properties: dict[str, list[dict[str, Any]]] = {}
    for spec in connectors:
        for key, prop in params_schema(spec)["properties"].items():
            if prop not in properties.setdefault(key, []):
                properties[key].append(prop)
    return {"type": "object", "additionalProperties": False,
            "properties": {key: props[0] if len(props) == 1 else {"anyOf": props} for key, props in properties.items()},
            "description": "Only the keys the connector in the path declares overridable (its `overridable`, "
                           "GET /api/v1/connectors/{connector_id}), with their types; any other key is a 422 "
                           "naming params.<key>."}


def _describe_connectors(schemas: dict[str, Any], connectors: Sequence[ConnectorSpec]) -> None:
    """/trigger's body per connector (a oneOf on connector_id); params of the path operations as a union."""
    trigger = schemas["TriggerRequest"]
    variants = []
    for spec in connectors:
        variant = copy.deepcopy(trigger)
        variant["title"] = f"TriggerRequest for {spec.id}"
        variant["properties"]["connector_id"] = {"type": "string", "const": spec.id}
        variant["properties"]["params"] = params_schema(spec)
        variant.pop("description", None)
        variants.append(variant)
    schemas["TriggerRequest"] = {"title": "TriggerRequest", "description": trigger.get("description", ""),
                                 "oneOf": variants}
    for name in ("RunOptions", "PreviewRequest"):
        schemas[name]["properties"]["params"] = _params_of_any(connectors)


@functools.cache
def _model_schemas() -> dict[str, Any]:
    """The JSON schemas of the API's models, made once per process (every app a test or a gunicorn worker builds
    made them again); build_document changes a copy."""
    _, schemas = models_json_schema([(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}")
    return schemas["$defs"]


def build_document(max_wait_seconds: float | None = None, *, connectors: Sequence[ConnectorSpec] = (),
                   workflows: Sequence[str] = (), api_keys: bool = False, callbacks: bool = False) -> dict[str, Any]:
    """The whole OpenAPI document of the gateway as configured.

    `max_wait_seconds` becomes the documented maximum of `wait`; `connectors` name the connector ids and the
    params each takes, `workflows` the workflow files' ids; security schemes (and 401/403) appear only with
    `api_keys`; `callback_url` only with `callbacks` (otherwise it is a 422, as for any field the document does
    not list).
    """
    defs = copy.deepcopy(_model_schemas())
    for model in (RunOptions, TriggerRequest, WorkflowExecuteRequest):
        if max_wait_seconds is not None:
            defs[model.__name__]["properties"]["wait"]["maximum"] = max_wait_seconds
        if not callbacks:
            del defs[model.__name__]["properties"]["callback_url"]
    result = defs["RunOut"]["properties"]["result"]  # stored as a document: described here, not validated
    result["anyOf"] = [_ref(LoadResult), {"type": "object", "title": "WorkflowResult",
                                          "description": "workflow_id, mode, layers, duration_seconds, outputs"},
                       {"type": "null"}]
    connector_id = _path_param("connector_id", pattern=CONNECTOR_ID)
    if connectors:
        _describe_connectors(defs, connectors)
        connector_id = _path_param("connector_id", enum=[spec.id for spec in connectors])
    workflow_id = _path_param("workflow_id", enum=list(workflows)) if workflows else _path_param(
        "workflow_id", pattern=NODE_ID)
    paths: dict[str, dict[str, Any]] = {
        "/health": {"get": {"operationId": "health", "summary": "Liveness; never waits on anything",
                            "responses": {"200": _json(Health, "The process is serving")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics, summed over every gunicorn worker",
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/v1/health/ready": {"get": {
            "operationId": "readiness", "summary": "Database, executor and Prefect checks",
            "responses": {"200": _json(Readiness, "Ready"), "503": _json(Readiness, "Not ready, with reasons")}}},
        "/api/v1/whoami": {"get": {
            "operationId": "whoami", "summary": "The caller's key name and scopes (any valid key)",
            "responses": {"200": _json(WhoAmI, "The caller")}}},
        "/trigger": {"post": {
            "operationId": "trigger", "summary": "Run a connector",
            "parameters": [_IDEMPOTENCY_HEADER], "requestBody": {**_body(TriggerRequest), "required": True},
            "responses": _run_started()}},
        "/api/v1/connectors": {"get": {"operationId": "listConnectors", "summary": "Configured connectors",
                                       "responses": {"200": _json(ConnectorList, "Connectors")}}},
        "/api/v1/connectors/{connector_id}": {"get": {
            "operationId": "getConnector", "summary": "A connector (secrets redacted) and its latest runs",
            "parameters": [connector_id],
            "responses": {"200": _json(ConnectorDetail, "The connector"), **_problems("404")}}},
        "/api/v1/connectors/{connector_id}/runs": {"post": {
            "operationId": "createConnectorRun", "summary": "Run a connector (same as /trigger)",
            "parameters": [connector_id, _IDEMPOTENCY_HEADER], "requestBody": _body(RunOptions),
            "responses": _run_started()}},
        "/api/v1/connectors/{connector_id}/preview": {"post": {
            "operationId": "previewConnector", "summary": "Sample rows per resource; nothing is loaded",
            "parameters": [connector_id], "requestBody": _body(PreviewRequest),
            "responses": {"200": _json(PreviewOut, "Sample rows and inferred columns"),
                          **_problems("400", "404", "413", "422", "429", "504")}}},
        "/api/v1/connectors/{connector_id}/schema": {"get": {
            "operationId": "getConnectorSchema", "summary": "Tables and columns loaded, read from the destination",
            "parameters": [connector_id],
            "responses": {"200": _json(ConnectorSchema, "The loaded tables"),
                          **_problems("404", "503")}}},
        "/api/v1/connectors/{connector_id}/schedule/pause": _schedule_switch("connector", connector_id, True),
        "/api/v1/connectors/{connector_id}/schedule/resume": _schedule_switch("connector", connector_id, False),
        "/api/v1/workflows": {"get": {"operationId": "listWorkflows", "summary": "The workflow files",
                                      "responses": {"200": _json(WorkflowList, "Workflows")}}},
        "/api/v1/workflows/{workflow_id}": {"get": {
            "operationId": "getWorkflow",
            "summary": "A workflow file: its graph, layers, inputs, schedule and latest runs",
            "parameters": [workflow_id],
            "responses": {"200": _json(WorkflowDetail, "The workflow"), **_problems("404")}}},
        "/api/v1/workflows/{workflow_id}/schedule/pause": _schedule_switch("workflow", workflow_id, True),
        "/api/v1/workflows/{workflow_id}/schedule/resume": _schedule_switch("workflow", workflow_id, False),
        "/api/v1/connectors/{connector_id}/stats": {"get": {
            "operationId": "getConnectorStats",
            "summary": "The connector's newest runs as points to draw (duration, backend, rows per table, fire lag)",
            "parameters": [connector_id, *_query_parameters(StatsQuery)],
            "responses": {"200": _json(ConnectorStats, "The runs, oldest first, and their counts"),
                          **_problems("404", "422")}}},
        "/api/workflow/{workflow_id}/execute": {"post": {
            "operationId": "executeWorkflow",
            "summary": "Start a workflow (from the workflows folder, or inline in `workflow`); answers at once",
            "parameters": [_path_param("workflow_id", pattern=NODE_ID), _IDEMPOTENCY_HEADER],
            "requestBody": _body(WorkflowExecuteRequest),
            "responses": {"200": _polled({
                              "description": "The execution ended within `wait`; or the conflict policy answered: "
                                             "with `on_conflict: join` (or `queue_one` finding one queued) the "
                                             "active execution, `joined: true` (WorkflowJoined, perhaps not ended); "
                                             "with `skip`, nothing was started (WorkflowSkipped)",
                              "content": {"application/json": {"schema": {"anyOf": [
                                  _ref(WorkflowAccepted), _ref(WorkflowJoined), _ref(WorkflowSkipped)]}}}}),
                          "202": _polled(_json(WorkflowAccepted, "The execution is queued or running; poll "
                                                                 "statusUrl")),
                          **_problems("400", "404", "409", "413", "422", "503")}}},
        "/api/workflow/execution/{execution_id}": {"get": {
            "operationId": "getWorkflowExecution", "summary": "A workflow execution, node by node",
            "parameters": [_path_param("execution_id", **_RUN_ID)],
            "responses": {"200": _polled(_json(WorkflowExecution, "The execution")), **_problems("404")}}},
        "/api/workflow/{workflow_id}/execute-node": {"post": {
            "operationId": "executeNode", "summary": "Run one node now with `inputData`; answers with its output",
            # The node runs on its own: the workflow id is the seed's path shape, not looked up, so any text will do.
            "parameters": [_path_param("workflow_id")], "requestBody": {**_body(ExecuteNodeRequest), "required": True},
            "responses": {"200": _json(NodeRunOut, "The node ran: `success` says whether it completed"),
                          **_problems("400", "413", "422", "429")}}},
        "/api/v1/runs": {"get": {
            "operationId": "listRuns", "summary": "Runs, newest first", "parameters": _query_parameters(RunQuery),
            "responses": {"200": _json(RunPage, "A page of runs"), **_problems("422")}}},
        "/api/v1/runs/{run_id}": {"get": {
            "operationId": "getRun", "summary": "A run", "parameters": [_path_param("run_id", **_RUN_ID)],
            "responses": {"200": _polled(_json(RunOut, "The run")), **_problems("404")}}},
        "/api/v1/runs/{run_id}/logs": {"get": {
            "operationId": "getRunLogs", "summary": "A run's log lines (local: captured; Prefect: from Prefect)",
            "parameters": [_path_param("run_id", **_RUN_ID), *_query_parameters(RunLogsQuery)],
            "responses": {"200": _json(RunLogs, "Log lines, oldest first"), **_problems("404", "422", "503")}}},
        "/api/v1/runs/rerun": {"post": {
            "operationId": "rerunRuns",
            "summary": "Rerun the ended runs a filter matches (newest first, at most `limit`, each at most once)",
            "requestBody": {**_body(BulkRerunRequest), "required": True},
            "responses": {"200": _json(BulkRerunOut, "What matched, and each rerun (none with dry_run)"),
                          **_problems("400", "413", "422")}}},
        "/api/v1/runs/{run_id}/rerun": {"post": {
            "operationId": "rerunRun", "summary": "A new run of what an ended run ran (`source: rerun`)",
            "parameters": [_path_param("run_id", **_RUN_ID), _IDEMPOTENCY_HEADER], "requestBody": _body(RerunRequest),
            "responses": {"200": _json(RunOut, "The rerun (an earlier one, by Idempotency-Key) has ended"),
                          "202": _polled(_json(RunOut, "The rerun is queued")),
                          **_problems("400", "404", "409", "413", "422", "503")}}},
        "/api/v1/runs/{run_id}/cancel": {"post": {
            "operationId": "cancelRun", "summary": "Cancel a queued or running run",
            "parameters": [_path_param("run_id", **_RUN_ID)],
            "responses": {"200": _json(RunOut, "Cancelled"),
                          "202": _polled(_json(RunOut, "Cancelling at the next checkpoint")),
                          **_problems("404", "409")}}},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "flowgate", "version": __version__,
                 "description": "Trigger gateway for dlt connectors; errors are application/problem+json."},
        "paths": paths,
        "components": {"schemas": defs},
    }
    for path, operations in paths.items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                operation["responses"].update(_problems("415"))
            if not api_keys and path != "/health":  # app/same_origin.py
                operation["responses"].update(_problems("421"))
                if method != "get":
                    operation["responses"]["403"] = {**_problems("403")["403"], "description": (
                        "A request from another web page (an Origin other than the gateway's): cross_origin_refused")}
    if api_keys:
        for path, operations in paths.items():
            for operation in operations.values():
                if path == "/health":
                    operation["security"] = []  # liveness is never behind a key
                else:
                    # 429: too many wrong keys from one address (FLOWGATE_AUTH_FAILURE_LIMIT)
                    operation["responses"].update(_problems("401", "403", "429"))
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from FLOWGATE_API_KEYS"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        # `read` for GET, `trigger` for the rest, `admin` for all (and alone for pausing and resuming schedules).
        document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document


def init_app(app: Flask, api_keys: bool) -> None:
    """Serve the document of this gateway's configuration at /openapi.json (built once per process)."""
    svc = app.extensions["flowgate"]
    document = build_document(svc.settings.max_wait_seconds, connectors=list(svc.registry),
                              workflows=[spec.id for spec in svc.workflows], api_keys=api_keys,
                              callbacks=bool(svc.settings.callback_secret))
    app.add_url_rule("/openapi.json", "openapi", lambda: document)
