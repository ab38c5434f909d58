"""Request and response shapes of the HTTP API; the views validate with them and the OpenAPI document shows them.
Over 300 lines because every shape the API takes or gives is here, so the views and the document read one module."""
from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from app.runs.models import Run
from connectors.secrets import public_error, scrub
from connectors.secrets import redact
from connectors.spec import CONNECTOR_ID
from flows.nodes import NODE_TYPES
from flows.outcome import STATUSES

RunStatus = Literal[STATUSES]  # type: ignore[valid-type]
NodeTypeName = Literal[tuple(sorted(NODE_TYPES))]  # type: ignore[valid-type]
INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL (run log line ids)
RUN_ID_PATTERN = r"^[0-9a-f]{32}$"  # the run store's ids (uuid4 hex); anything else is no run
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9a-f]{32}$"  # microseconds since the epoch, then a run id
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII, as an HTTP header value can carry it


def _integral_float(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer; strict pydantic would refuse it. Booleans and strings stay refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _query_integer(value: Any) -> Any:
    # A query string is text: take a JSON number without a fraction ("5", "5.0", "5e1"), nothing looser.
    if not isinstance(value, str) or not re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", value):
        raise PydanticCustomError("int_parsing", "Input should be an integer")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise PydanticCustomError("int_parsing", "Input should be an integer") from None
    if number != number.to_integral_value():
        raise PydanticCustomError("int_from_float", "Input should be an integer, without a fractional part")
    return int(number) if abs(number) < 10**30 else float(number)  # past any bound: let `le`/`ge` say so


JsonInt = Annotated[int, BeforeValidator(_integral_float)]
QueryInt = Annotated[int, BeforeValidator(_query_integer)]


class _Request(BaseModel):
    # Strict: a boolean or a string is never taken as a number, where the document says number or integer.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Query(BaseModel):
    # Query values arrive as text; integers are parsed by QueryInt, strings taken as they are.
    model_config = ConfigDict(extra="forbid")


class RunOptions(_Request):
    """How to run: parameters, whether to wait, which backend, and a key that makes retries safe."""

    params: dict[str, Any] = Field(default_factory=dict,
                                   description="Overrides of the fields the connector declares overridable.")
    wait: float = Field(0, ge=0, description="Seconds to block for the run to end (0: answer 202 at once).")
    backend: Literal["auto", "local", "prefect"] | None = Field(
        None, description="Force a path; default is the gateway's FLOWGATE_BACKEND.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=255, pattern=IDEMPOTENCY_KEY_PATTERN,
                                        description="Same key, same run (also read from the Idempotency-Key header).")
    callback_url: str | None = Field(None, min_length=1, max_length=2000,
                                     description="POSTed the run document, signed, when the run ends.")


class TriggerRequest(RunOptions):
    """Body of POST /trigger, the contract the existing callers use."""

    connector_id: str = Field(min_length=1, max_length=200, description="Id of a connector in connectors.yaml.")


class PreviewRequest(_Request):
    """Body of POST /api/v1/connectors/<id>/preview."""

    limit: JsonInt = Field(20, ge=1, le=1000, description="Sample rows per resource.")
    params: dict[str, Any] = Field(default_factory=dict, description="The same overrides a trigger may give.")


class PreviewOut(BaseModel):
    """Sample rows and inferred columns per resource; nothing was loaded."""

    connector_id: str
    resources: dict[str, dict[str, Any]]


class ConnectorSchema(BaseModel):
    """Tables and columns the connector has loaded; `source` says whether read from the destination itself."""

    connector_id: str
    dataset: str
    destination: str
    source: Literal["destination", "dlt_schema"]
    location: str | None
    tables: dict[str, list[dict[str, Any]]]


class WorkflowExecuteRequest(_Request):
    """Body of POST /api/workflow/<workflow_id>/execute."""

    inputs: dict[str, Any] = Field(default_factory=dict, description="Available to templates as `inputs`.")
    mode: Literal["optimized", "legacy"] = Field(
        "optimized", description="optimized: each layer's nodes in parallel; legacy: one node at a time.")
    workflow: dict[str, Any] | None = Field(
        None, description="An inline definition (nodes, connections) instead of the one in the workflows folder.")
    backend: Literal["auto", "local", "prefect"] | None = Field(
        None, description="Force a path; default is the gateway's FLOWGATE_BACKEND.")
    wait: float = Field(0, ge=0, description="Seconds to block for the execution to end (0: answer at once).")
    callback_url: str | None = Field(None, min_length=1, max_length=2000,
                                     description="POSTed the run document, signed, when the execution ends.")


class WorkflowAccepted(BaseModel):
    """The answer to execute: the seed's shape, plus where to follow the execution."""

    success: bool
    executionId: str
    status: RunStatus
    message: str
    backend: str
    statusUrl: str


class NodeExecutionOut(BaseModel):
    """One node of an execution."""

    id: str
    type: str
    layer: int
    status: Literal["pending", "running", "completed", "failed", "skipped", "upstream_failed", "cancelled"]
    attempts: int
    cached: bool
    started_at: str | None
    finished_at: str | None
    duration_seconds: float | None
    output: Any = None
    error: dict[str, Any] | None = None


class WorkflowExecution(BaseModel):
    """GET /api/workflow/execution/<id>: the workflow's status and every node's."""

    success: bool
    executionId: str
    workflowId: str
    status: RunStatus
    mode: str
    backend: str
    fallbackReason: str | None
    prefectFlowRunId: str | None
    createdAt: datetime
    startedAt: datetime | None
    finishedAt: datetime | None
    durationSeconds: float | None
    layers: list[list[str]]
    outputs: dict[str, Any]
    error: dict[str, Any] | None
    nodes: list[NodeExecutionOut]


class ExecuteNodeRequest(_Request):
    """Body of POST /api/workflow/<workflow_id>/execute-node (the seed's shape)."""

    nodeId: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$")
    nodeType: NodeTypeName = Field(description="One of the node types this gateway knows.")
    node: dict[str, Any] = Field(default_factory=dict, description="The node: id, type, config (templates allowed).")
    inputData: dict[str, Any] = Field(default_factory=dict, description="The node's input, and `inputs` of templates.")


class NodeRunOut(BaseModel):
    """The answer to execute-node: output on success, error otherwise."""

    success: bool
    nodeId: str
    output: Any = None
    error: dict[str, Any] | None = None
    mode: Literal["local"]
    durationSeconds: float | None


class RunQuery(_Query):
    """Query parameters of GET /api/v1/runs."""

    connector_id: str | None = Field(None, pattern=CONNECTOR_ID)
    status: RunStatus | None = None
    backend: Literal["local", "prefect"] | None = Field(None, description="Only runs on this backend.")
    limit: QueryInt = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, pattern=CURSOR_PATTERN, description="next_cursor from the previous page.")


class RunOut(BaseModel):
    """A run as callers see it."""

    run_id: str
    kind: str
    connector_id: str | None
    workflow_id: str | None
    status: RunStatus
    backend: str
    params: dict[str, Any]
    fallback_reason: str | None
    prefect_flow_run_id: str | None
    prefect_state: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None = Field(description="The load summary once completed: rows per table, "
                                                      "load ids, destination, dataset, duration.")
    error: dict[str, Any] | None
    callback: dict[str, Any] | None = Field(
        None, description="Where the run document is POSTed when it ends: url (no query), status "
                          "(pending, delivered, failed) and every attempt.")
    trace_id: str | None = Field(None, description="The W3C trace id the run belongs to: the caller's `traceparent`'s, "
                                                   "or one flowgate started; on every log line of the run.")
    status_url: str

    @classmethod
    def from_run(cls, run: Run, status_url: str) -> RunOut:
        """Build from a stored run."""
        return cls(run_id=run.id, kind=run.kind, connector_id=run.target if run.kind == "connector" else None,
                   workflow_id=run.target if run.kind == "workflow" else None,
                   status=run.status, backend=run.backend, params=redact(run.params or {}),
                   fallback_reason=run.fallback_reason, prefect_flow_run_id=run.prefect_flow_run_id,
                   prefect_state=run.prefect_state, attempts=run.attempts, created_at=run.created_at,
                   started_at=run.started_at, finished_at=run.finished_at, result=scrub(run.result), error=public_error(run.error),
                   callback=run.callback.to_dict() if run.callback else None, trace_id=run.trace_id,
                   status_url=status_url)


class RunLogsQuery(_Query):
    """Query parameters of GET /api/v1/runs/<id>/logs."""

    after: QueryInt = Field(0, ge=0, le=INT32_MAX,
                            description="next_after of the previous page (a line id: at most what the store holds).")
    limit: QueryInt = Field(200, ge=1, le=1000)


class RunLogLine(BaseModel):
    at: datetime
    level: str
    logger: str
    message: str


class RunLogs(BaseModel):
    """A run's log lines: captured by flowgate for local runs, read from Prefect's logs API for Prefect runs."""

    run_id: str
    source: Literal["flowgate", "prefect"]
    items: list[RunLogLine]
    next_after: int | None = Field(description="Pass as `after` for the lines that follow; null at the end.")


class RunPage(BaseModel):
    """A page of runs, newest first."""

    items: list[RunOut]
    next_cursor: str | None


class ConnectorOut(BaseModel):
    """A connector in the list."""

    id: str
    description: str
    source_kind: str
    destination_kind: str
    dataset: str
    write_disposition: str
    overridable: list[str]


class ConnectorDetail(BaseModel):
    """A connector with its (redacted) spec and latest runs."""

    id: str
    description: str
    spec: dict[str, Any] = Field(description="The connector as declared, secrets replaced by ***.")
    overridable: list[str]
    latest_runs: list[RunOut]


class ConnectorList(BaseModel):
    items: list[ConnectorOut]


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["healthy"]
    service: str
    version: str


class Readiness(BaseModel):
    """Readiness: can the gateway accept and run work, and if not, why."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, dict[str, Any]]


class WhoAmI(BaseModel):
    """The caller's API key: its name and what it may do (`anonymous` with every scope when no keys are set)."""

    name: str
    scopes: list[Literal["read", "trigger", "admin"]]
    authenticated: bool


class ProblemDetail(BaseModel):
    """RFC 9457 problem document; `code` is stable, `errors` names each bad field."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
