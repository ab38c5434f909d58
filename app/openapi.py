"""The OpenAPI 3.1 document of the HTTP API, built from the same pydantic models the views validate with."""
from __future__ import annotations

from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app import __version__
from app.schemas import (
    ConnectorDetail, ConnectorList, ConnectorSchema, ExecuteNodeRequest, Health, NodeRunOut, PreviewOut, PreviewRequest,
    ProblemDetail, Readiness, RunLogs, RunLogsQuery, RunOptions, RunOut, RunPage, RunQuery, TriggerRequest,
    WorkflowAccepted,
    WorkflowExecuteRequest, WorkflowExecution,
)

_MODELS: list[type[BaseModel]] = [TriggerRequest, RunOptions, RunOut, RunPage, ConnectorList, ConnectorDetail,
                                  Health, Readiness, ProblemDetail, PreviewRequest, PreviewOut,
                                  ConnectorSchema, WorkflowExecuteRequest, WorkflowAccepted, WorkflowExecution,
                                  ExecuteNodeRequest, NodeRunOut, RunLogs]
_PROBLEMS = {"400": "Malformed JSON or a body that is not an object", "401": "No valid API key (when keys are set)",
             "403": "The API key lacks the scope", "404": "Unknown resource",
             "405": "Method not allowed", "413": "Body too large", "422": "A field is missing, mistyped or unknown",
             "429": "Too many requests: the caller's rate limit, or too many wrong API keys from this address"}


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


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": 255}}


def _run_started(*problems: str) -> dict[str, Any]:
    return {"200": _json(RunOut, "The run ended within `wait`"),
            "202": _json(RunOut, "The run is queued or running; poll status_url"),
            **_problems("400", "404", "409", "413", "422", "503", *problems)}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema["properties"].items()]


def build_document(max_wait_seconds: float | None = None) -> dict[str, Any]:
    """The whole OpenAPI document; `max_wait_seconds` (a setting) becomes the documented maximum of `wait`."""
    _, schemas = models_json_schema([(m, "validation") for m in _MODELS],
                                    ref_template="#/components/schemas/{model}")
    if max_wait_seconds is not None:
        for model in (RunOptions, TriggerRequest, WorkflowExecuteRequest):
            schemas["$defs"][model.__name__]["properties"]["wait"]["maximum"] = max_wait_seconds
    paths = {
        "/health": {"get": {"operationId": "health", "summary": "Liveness; never waits on anything",
                            "responses": {"200": _json(Health, "The process is serving")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics, summed over every gunicorn worker",
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/api/v1/health/ready": {"get": {
            "operationId": "readiness", "summary": "Database, executor and Prefect checks",
            "responses": {"200": _json(Readiness, "Ready"), "503": _json(Readiness, "Not ready, with reasons")}}},
        "/trigger": {"post": {
            "operationId": "trigger", "summary": "Run a connector",
            "parameters": [_IDEMPOTENCY_HEADER], "requestBody": {**_body(TriggerRequest), "required": True},
            "responses": _run_started()}},
        "/api/v1/connectors": {"get": {"operationId": "listConnectors", "summary": "Configured connectors",
                                       "responses": {"200": _json(ConnectorList, "Connectors")}}},
        "/api/v1/connectors/{connector_id}": {"get": {
            "operationId": "getConnector", "summary": "A connector (secrets redacted) and its latest runs",
            "parameters": [_path_param("connector_id")],
            "responses": {"200": _json(ConnectorDetail, "The connector"), **_problems("404")}}},
        "/api/v1/connectors/{connector_id}/runs": {"post": {
            "operationId": "createConnectorRun", "summary": "Run a connector (same as /trigger)",
            "parameters": [_path_param("connector_id"), _IDEMPOTENCY_HEADER], "requestBody": _body(RunOptions),
            "responses": _run_started()}},
        "/api/v1/connectors/{connector_id}/preview": {"post": {
            "operationId": "previewConnector", "summary": "Sample rows per resource; nothing is loaded",
            "parameters": [_path_param("connector_id")], "requestBody": _body(PreviewRequest),
            "responses": {"200": _json(PreviewOut, "Sample rows and inferred columns"),
                          **_problems("400", "404", "413", "422")}}},
        "/api/v1/connectors/{connector_id}/schema": {"get": {
            "operationId": "getConnectorSchema", "summary": "Tables and columns loaded, read from the destination",
            "parameters": [_path_param("connector_id")],
            "responses": {"200": _json(ConnectorSchema, "The loaded tables"),
                          **_problems("404", "503")}}},
        "/api/workflow/{workflow_id}/execute": {"post": {
            "operationId": "executeWorkflow",
            "summary": "Start a workflow (from the workflows folder, or inline in `workflow`); answers at once",
            "parameters": [_path_param("workflow_id"), _IDEMPOTENCY_HEADER],
            "requestBody": _body(WorkflowExecuteRequest),
            "responses": {"200": _json(WorkflowAccepted, "The execution ended within `wait`"),
                          "202": _json(WorkflowAccepted, "The execution is queued or running; poll statusUrl"),
                          **_problems("400", "404", "409", "413", "422", "503")}}},
        "/api/workflow/execution/{execution_id}": {"get": {
            "operationId": "getWorkflowExecution", "summary": "A workflow execution, node by node",
            "parameters": [_path_param("execution_id")],
            "responses": {"200": _json(WorkflowExecution, "The execution"), **_problems("404")}}},
        "/api/workflow/{workflow_id}/execute-node": {"post": {
            "operationId": "executeNode", "summary": "Run one node now with `inputData`; answers with its output",
            "parameters": [_path_param("workflow_id")], "requestBody": {**_body(ExecuteNodeRequest), "required": True},
            "responses": {"200": _json(NodeRunOut, "The node ran: `success` says whether it completed"),
                          **_problems("400", "413", "422")}}},
        "/api/v1/runs": {"get": {
            "operationId": "listRuns", "summary": "Runs, newest first", "parameters": _query_parameters(RunQuery),
            "responses": {"200": _json(RunPage, "A page of runs"), **_problems("422")}}},
        "/api/v1/runs/{run_id}": {"get": {
            "operationId": "getRun", "summary": "A run", "parameters": [_path_param("run_id")],
            "responses": {"200": _json(RunOut, "The run"), **_problems("404")}}},
        "/api/v1/runs/{run_id}/logs": {"get": {
            "operationId": "getRunLogs", "summary": "A run's log lines (local: captured; Prefect: from Prefect)",
            "parameters": [_path_param("run_id"), *_query_parameters(RunLogsQuery)],
            "responses": {"200": _json(RunLogs, "Log lines, oldest first"), **_problems("404", "422", "503")}}},
        "/api/v1/runs/{run_id}/cancel": {"post": {
            "operationId": "cancelRun", "summary": "Cancel a queued or running run",
            "parameters": [_path_param("run_id")],
            "responses": {"200": _json(RunOut, "Cancelled"), "202": _json(RunOut, "Cancelling at the next checkpoint"),
                          **_problems("404", "409")}}},
    }
    for path, operations in paths.items():
        for operation in operations.values():
            if path == "/health":
                operation["security"] = []  # liveness is never behind a key
            else:
                operation["responses"].update(_problems("401", "403", "429"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "flowgate", "version": __version__,
                 "description": "Trigger gateway for dlt connectors; errors are application/problem+json."},
        "paths": paths,
        "components": {"schemas": schemas["$defs"], "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from FLOWGATE_API_KEYS"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
        # Applies when the gateway has keys configured: `read` for GET, `trigger` for the rest, `admin` for all.
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def init_app(app: Flask) -> None:
    """Serve the document at /openapi.json (built once per process)."""
    document = build_document(app.extensions["flowgate"].settings.max_wait_seconds)
    app.add_url_rule("/openapi.json", "openapi", lambda: document)
