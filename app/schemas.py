"""Request and response shapes of the HTTP API; the views validate with them and the OpenAPI document shows them.
Over 300 lines because every shape the API takes or gives is here, so the views and the document read one module."""
from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from app.runs.history import RunPoint
from app.runs.models import Run
from connectors.failures import RetryPolicy
from connectors.nesting import MAX_DEPTH, NestedTooDeep, check_depth
from connectors.secrets import public_error, redact, scrub
from connectors.shown_paths import shown_path
from connectors.spec import CONNECTOR_ID, OnConflict
from flows.nodes import NODE_TYPES
from flows.outcome import STATUSES

RunStatus = Literal[STATUSES]  # type: ignore[valid-type]
if TYPE_CHECKING:  # a Literal built at run time is no type to a checker: there, a node type's name is a str
    NodeTypeName = str
else:  # the node types this gateway knows, an enum in the OpenAPI document
    NodeTypeName = Literal[tuple(sorted(NODE_TYPES))]
INT32_MAX = 2**31 - 1  # an Integer column on PostgreSQL (run log line ids)
RUN_ID_PATTERN = r"^[0-9a-f]{32}$"  # the run store's ids (uuid4 hex); anything else is no run
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9a-f]{32}$"  # microseconds since the epoch, then a run id
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"  # printable ASCII, as an HTTP header value can carry it
LABEL_KEY_PATTERN = r"^[a-z][a-z0-9_.-]{0,62}$"
MAX_LABELS, MAX_LABEL_VALUE = 16, 256
LABEL_QUERY_PATTERN = r"^[a-z][a-z0-9_.-]{0,62}:[\s\S]{0,256}$"  # key:value


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
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(
    max_length=MAX_LABELS, json_schema_extra={"additionalProperties": False},
    description=f"Up to {MAX_LABELS} labels (`{{\"tenant\": \"acme\"}}`): keys {LABEL_KEY_PATTERN}, values at most "
                f"{MAX_LABEL_VALUE} characters. On the run, in its callback, and tags of its Prefect flow run.")]
QueryInt = Annotated[int, BeforeValidator(_query_integer)]
LabelMatch = Annotated[str, StringConstraints(pattern=LABEL_QUERY_PATTERN)]  # `tenant:acme`


def _one_or_more(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A filter's labels: one `key:value`, or a list of them that a run must all have.
_LabelMatchList = Annotated[list[LabelMatch], Field(max_length=MAX_LABELS)]
LabelMatches = Annotated[_LabelMatchList, BeforeValidator(_one_or_more,
                                                          json_schema_input_type=LabelMatch | _LabelMatchList)]


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
    retry: RetryPolicy | None = Field(None, description="Run it again after a failure of these classes, under the "
                                                        "same run id (overrides the connector's `retry`).")
    labels: Labels = Field(default_factory=dict)
    on_conflict: OnConflict | None = Field(
        None, description="When the connector has a queued or running run: `queue` another (the default), `join` "
                          "it (its document is the answer), `skip` (200, nothing started), `reject` (409 naming it), "
                          "`queue_one` (at most one queued behind the running one; later triggers join it). "
                          "Overrides the connector's `on_conflict`.")


class TriggerRequest(RunOptions):
    """Body of POST /trigger, the contract the existing callers use."""

    connector_id: str = Field(min_length=1, max_length=200, description="Id of a connector in connectors.yaml.")


class TriggerSkipped(BaseModel):
    """The answer to a trigger with `on_conflict: skip` while its connector had an active run: nothing started."""

    skipped: Literal["already_active"] = Field(description="Why nothing was started: the connector had a queued or "
                                                         "running run (`active_run_id`).")
    detail: str
    active_run_id: str
    active_run_url: str


class PreviewRequest(_Request):
    """Body of POST /api/v1/connectors/<id>/preview."""

    limit: JsonInt = Field(20, ge=1, le=1000, description="Sample rows per resource.")
    params: dict[str, Any] = Field(default_factory=dict, description="The same overrides a trigger may give.")


class ColumnOut(BaseModel):
    """A column: its name as loaded, and its type (dlt's data type; in a preview, the sampled value's)."""

    name: str
    type: str


class TypeChange(BaseModel):
    """A column whose dlt data type changed (a full refresh recreated its table)."""

    name: str
    from_: str = Field(alias="from")
    to: str


class TableChanges(BaseModel):
    """What a run changed in one table, against the schema the destination held before the run."""

    new_table: bool
    new_columns: list[ColumnOut]
    variant_columns: list[ColumnOut] = Field(description="Columns dlt added for values of another type than "
                                                         "their column's, named <column>__v_<type>.")
    type_changes: list[TypeChange]


class IncrementalWindow(BaseModel):
    """An incremental table's window: where its cursor stood when the run started and where the run left it."""

    cursor_path: str
    from_: Any = Field(alias="from", description="The cursor's last value before the run (its initial value on a "
                                                 "first run or a full refresh).")
    to: Any = Field(description="The last cursor value loaded (`from` again when nothing new came).")
    rows: int = Field(description="Rows the run loaded into the table.")


class MergeCounts(BaseModel):
    """A merge table's rows: how many the table gained, and how many of the rows loaded replaced a row."""

    inserted: int
    updated: int


class LoadResult(BaseModel):
    """A completed connector run's result, the same on either path (local, Prefect)."""

    connector_id: str
    pipeline_name: str
    destination: str
    dataset: str
    location: str | None
    rows: dict[str, int] = Field(description="Rows per table of every load package the run loaded, a package an "
                                             "interrupted run left included.")
    load_ids: list[str]
    duration_seconds: float
    schema_changes: dict[str, TableChanges] = Field(
        default_factory=dict, description="Tables the run created or changed; the first run lists every table.")
    incremental: dict[str, IncrementalWindow] = Field(default_factory=dict,
                                                      description="Per incremental table.")
    merge: dict[str, MergeCounts] = Field(default_factory=dict,
                                          description="Per merge table (DuckDB destinations only).")


class RefusedChange(BaseModel):
    """A new table or column the connector's schema contract would not take: freeze fails the run, discard_row
    and discard_value drop the row or the value."""

    entity: Literal["tables", "columns"]
    column: str | None
    mode: Literal["freeze", "discard_row", "discard_value"]


class TablePreviewChanges(BaseModel):
    new_table: bool
    new_columns: list[ColumnOut]
    refused: list[RefusedChange]


class PreviewChanges(BaseModel):
    """The sampled tables and columns the destination lacks (types not compared), by table."""

    compared_with: Literal["destination", "dlt_schema"]
    tables: dict[str, TablePreviewChanges]


class PreviewOut(BaseModel):
    """Sample rows and inferred columns per resource, and what would be new at the destination; nothing was
    loaded."""

    connector_id: str
    resources: dict[str, dict[str, Any]] = Field(description="Per resource: the table it writes, its format "
                                                             "(arrow, objects), sample rows and columns.")
    changes: PreviewChanges | None
    changes_unavailable: str | None = Field(description="Why `changes` is null: a load holds the destination.")


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
    retry: RetryPolicy | None = Field(None, description="Run it again after a failure of these classes, under the "
                                                        "same id (overrides the workflow's `retry`).")
    labels: Labels = Field(default_factory=dict)
    on_conflict: OnConflict | None = Field(
        None, description="When the workflow has a queued or running execution: `queue` another (the default), "
                          "`join` it (its executionId is the answer), `skip` (200, nothing started), `reject` (409 "
                          "naming it), `queue_one` (at most one queued behind the running one; later executes join "
                          "it). Overrides the workflow's `on_conflict`.")


class WorkflowAccepted(BaseModel):
    """The answer to execute: the seed's shape, plus where to follow the execution."""

    success: bool
    executionId: str
    status: RunStatus
    message: str
    backend: str
    statusUrl: str


class WorkflowJoined(WorkflowAccepted):
    """The answer to execute whose conflict policy (`join`, or `queue_one` finding one queued) joined an active
    execution: that execution's id and status, marked so."""

    joined: Literal[True]


class WorkflowSkipped(BaseModel):
    """The answer to execute with `on_conflict: skip` while the workflow had an active execution: nothing started."""

    success: Literal[True]
    skipped: Literal["already_active"] = Field(description="Why nothing was started: the workflow had a queued or "
                                                         "running execution (`activeExecutionId`).")
    message: str
    activeExecutionId: str
    statusUrl: str = Field(description="The active execution's.")


class NodeExecutionOut(BaseModel):
    """One node of an execution."""

    id: str
    type: str
    layer: int
    status: Literal["pending", "running", "completed", "failed", "skipped", "upstream_failed", "cancelled"]
    attempts: int
    cached: bool
    reused: bool = Field(False, description="A rerun from the failed nodes took this output from the run it reruns.")
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
    unreadable: bool = Field(False, description="The stored run nests deeper than the gateway shows: its layers, "
                                                "outputs and nodes are left out, and `error` says so "
                                                "(`unreadable_run`).")


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
    source: Literal["api", "schedule", "rerun", "workflow", "prefect"] | None = Field(
        None, description="Only runs a caller started (api), a schedule's slot (schedule), a rerun (rerun), a "
                          "workflow's connector node (workflow) or someone in Prefect (prefect: adopted) started.")
    label: list[LabelMatch] = Field(
        default_factory=list, max_length=MAX_LABELS,
        description="Only runs with this label, as `key:value` (`tenant:acme`); repeated, only runs with every one "
                    "of them (`label=tenant:acme&label=batch:7`).")
    limit: QueryInt = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, pattern=CURSOR_PATTERN, description="next_cursor from the previous page.")


class AttemptOut(BaseModel):
    """One attempt of a run: where it ran, when, and how it ended (`status` of the run while it goes on)."""

    attempt: int
    backend: str
    started_at: datetime | None
    ended_at: datetime | None
    status: RunStatus
    error: dict[str, Any] | None = Field(None, description="Why it failed, with its `failure_class`.")
    prefect_flow_run_id: str | None = None


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
    attempt: int = Field(description="The number of the current (or last) attempt, from 1.")
    attempts: list[AttemptOut] = Field(description="Every attempt so far, oldest first (the last one is the run's "
                                                   "own state); a run never started has none.")
    next_attempt_at: datetime | None = Field(description="A retry waiting to start: not before this time.")
    rerun_of: str | None = Field(description="The run this one reruns.")
    triggered_by: str = Field(description="The name of the API key that started it, or `anonymous`.")
    labels: dict[str, str] = Field(description="The labels it was started with.")
    joined_count: int = Field(description="Triggers that got this run as their answer through their conflict "
                                             "policy (`join`, or `queue_one` finding it queued); the one that "
                                             "started it is not counted.")
    retry: RetryPolicy | None = Field(description="The retry policy in effect (null: a failure ends the run).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None = Field(description="Once completed: a connector's LoadResult (rows per table, "
                                                      "schema changes, incremental windows, the DuckDB file's "
                                                      "location relative to the gateway's project folder, ...), a "
                                                      "workflow's outputs.")
    error: dict[str, Any] | None
    callback: dict[str, Any] | None = Field(
        None, description="Where the run document is POSTed when it ends: url (no query), status "
                          "(pending, delivered, failed) and every attempt.")
    source: Literal["api", "schedule", "rerun", "workflow", "prefect"] = Field(
        "api", description="Who started the run: a caller (api), a schedule's slot (schedule), a rerun (of "
                           "`rerun_of`), a workflow's connector node (workflow), someone in Prefect's UI, CLI or "
                           "API (prefect: a flow run of a flowgate deployment the gateway did not create, adopted "
                           "by its flow run id).")
    scheduled_for: datetime | None = Field(None, description="A scheduled run's slot: when it was due.")
    schedule: dict[str, Any] | None = Field(
        None, description="A scheduled run's rule as declared (cron, interval or rrule, timezone, catch_up) and "
                          "late_seconds: how long after its slot the run was created (a caught-up slot's lateness).")
    trace_id: str | None = Field(None, description="The W3C trace id the run belongs to: the caller's `traceparent`'s, "
                                                   "or one flowgate started; on every log line of the run.")
    status_url: str
    unreadable: bool = Field(
        False, description="The stored run nests deeper than the gateway shows (more than "
                           f"{MAX_DEPTH} levels): its params, result, labels and attempts are left out, and `error` "
                           "says so (`unreadable_run`). Runs stored before inputs were bounded may be such.")

    @classmethod
    def from_run(cls, run: Run, status_url: str, project: Path | None = None) -> RunOut:
        """Build from a stored run; with `project` (the gateway's folder) the DuckDB file's location relative to it.
        NestedTooDeep when a stored document nests deeper than MAX_DEPTH (scrub walks nothing while no secret is
        known, so the depth is checked first, whatever the walkers do)."""
        for document in (run.params, run.result, run.error, run.attempt_log, run.schedule):
            check_depth(document)
        result = scrub(run.result)
        if project is not None and result and isinstance(result.get("location"), str):
            result = {**result, "location": shown_path(result["location"], project)}
        return cls(run_id=run.id, kind=run.kind, connector_id=run.target if run.kind == "connector" else None,
                   workflow_id=run.target if run.kind == "workflow" else None,
                   status=run.status, backend=run.backend, params=redact(run.params or {}),
                   fallback_reason=run.fallback_reason, prefect_flow_run_id=run.prefect_flow_run_id,
                   prefect_state=run.prefect_state, attempt=run.attempt or 1, attempts=_attempts(run),
                   next_attempt_at=run.next_attempt_at if run.status == "queued" else None,
                   retry=run.retry_policy, rerun_of=run.rerun_of, triggered_by=run.triggered_by or "anonymous",
                   labels=run.labels or {}, joined_count=run.joined_count or 0, created_at=run.created_at,
                   started_at=run.started_at, finished_at=run.finished_at, result=result, error=public_error(run.error),
                   callback=run.callback.to_dict() if run.callback else None, source=run.source or "api",
                   scheduled_for=run.scheduled_for, schedule=run.schedule, trace_id=run.trace_id,
                   status_url=status_url)


    @classmethod
    def unreadable_run(cls, run: Run, status_url: str, reason: Exception) -> RunOut:
        """What can be shown of a run whose stored documents cannot be (`reason`): its columns, not its JSON."""
        return cls(run_id=run.id, kind=run.kind, connector_id=run.target if run.kind == "connector" else None,
                   workflow_id=run.target if run.kind == "workflow" else None, status=run.status, backend=run.backend,
                   params={}, fallback_reason=run.fallback_reason, prefect_flow_run_id=run.prefect_flow_run_id,
                   prefect_state=run.prefect_state, attempt=run.attempt or 1, attempts=[],
                   next_attempt_at=run.next_attempt_at if run.status == "queued" else None, retry=None,
                   rerun_of=run.rerun_of, triggered_by=run.triggered_by or "anonymous", labels={},
                   joined_count=run.joined_count or 0, created_at=run.created_at, started_at=run.started_at,
                   finished_at=run.finished_at, result=None,
                   error={"code": "unreadable_run", "message": f"the stored run cannot be shown: {reason}"},
                   source=run.source or "api", scheduled_for=run.scheduled_for, trace_id=run.trace_id,
                   status_url=status_url, unreadable=True)

    @classmethod
    def shown(cls, run: Run, status_url: str, project: Path | None = None) -> RunOut:
        """A run as the API shows it; a run stored too deeply nested to show is shown as `unreadable`, so a page
        listing it still works."""
        try:
            return cls.from_run(run, status_url, project)
        except (NestedTooDeep, RecursionError) as exc:
            return cls.unreadable_run(run, status_url, exc)


class RunJoined(RunOut):
    """The answer to a trigger whose conflict policy (`join`, or `queue_one` finding one queued) joined an active
    run: that run's document, marked so."""

    joined: Literal[True]


def _attempts(run: Run) -> list[dict[str, Any]]:
    """The attempts that ended before this one, and this one once it has started (or failed without starting)."""
    attempts = [{**entry, "error": public_error(entry.get("error"))} for entry in run.attempt_log or ()]
    if run.started_at is not None or run.status in ("failed", "crashed"):
        attempts.append({"attempt": run.attempt or 1, "backend": run.backend, "started_at": run.started_at,
                         "ended_at": run.finished_at, "status": run.status, "error": public_error(run.error),
                         "prefect_flow_run_id": run.prefect_flow_run_id})
    return attempts


class RerunRequest(_Request):
    """Body of POST /api/v1/runs/<id>/rerun: what to change, and (a workflow) where to start."""

    params: dict[str, Any] | None = Field(None, description="A connector run: overrides over the run's params.")
    inputs: dict[str, Any] | None = Field(None, description="A workflow run: inputs over the run's inputs.")
    from_: Literal["start", "failed"] = Field(
        "start", alias="from", description="A workflow run: `failed` reuses the completed nodes' outputs and runs "
                                           "only the failed and the nodes after them.")


class RerunFilter(_Request):
    """Which ended runs a bulk rerun takes, newest first."""

    connector_id: str | None = Field(None, pattern=CONNECTOR_ID, description="A connector's runs.")
    workflow_id: str | None = Field(None, pattern=CONNECTOR_ID, description="A workflow's runs.")
    status: Literal["failed", "crashed", "cancelled", "completed"] = Field("failed", description="How they ended.")
    backend: Literal["local", "prefect"] | None = None
    label: LabelMatches | None = Field(None, description="Only runs with this label (`key:value`), or with every "
                                                          "label of a list of them.")


class BulkRerunRequest(_Request):
    """Body of POST /api/v1/runs/rerun."""

    filter: RerunFilter = Field(description="Which runs; each is rerun at most once, however often asked.")
    dry_run: bool = Field(False, description="Only list what would rerun.")
    limit: JsonInt = Field(20, ge=1, le=100, description="At most this many source runs (the newest).")


class BulkRerunItem(BaseModel):
    """One matched run and its rerun (none in a dry run, or with `error` when it could not be started)."""

    run_id: str
    kind: str
    target: str
    status: RunStatus
    rerun_run_id: str | None
    created: bool = Field(description="This call started the rerun (false: an earlier call had, or a dry run).")
    error: dict[str, Any] | None = None


class BulkRerunOut(BaseModel):
    """What a bulk rerun matched and did."""

    dry_run: bool
    items: list[BulkRerunItem]
    more: bool = Field(description="More runs matched than `limit`: ask again for the next ones (older).")


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


class ScheduleOut(BaseModel):
    """A connector's or workflow's schedule as the gateway fires it, and what became of its slots."""

    cron: str | None = None
    interval: float | None = None
    rrule: str | None = None
    timezone: str
    catch_up: Literal["latest", "all", "none"]
    max_catch_up: int
    state: Literal["active", "paused", "inactive"] = Field(
        description="inactive: the YAML says `active: false`; paused: through POST .../schedule/pause.")
    paused_at: datetime | None
    paused_by: str | None = Field(description="The API key's name that paused it (null without keys).")
    next_fire_times: list[datetime] = Field(
        description="The next five slots in the schedule's time zone (empty while paused or inactive).")
    missed_slots: int = Field(description="Slots that passed while no gateway ran and catch_up did not run.")
    skipped_slots: int = Field(description="Slots that came while a run of the schedule was already waiting.")
    last_skipped_for: datetime | None
    last_run: RunOut | None = Field(description="The schedule's newest run (by slot).")


class ConnectorDetail(BaseModel):
    """A connector with its (redacted) spec, its schedule and latest runs."""

    id: str
    description: str
    spec: dict[str, Any] = Field(description="The connector as declared, secrets replaced by ***.")
    overridable: list[str]
    schedule: ScheduleOut | None = Field(description="Its schedule; null when it has none.")
    latest_runs: list[RunOut]


class WorkflowOut(BaseModel):
    """A workflow file in the list."""

    id: str
    description: str
    nodes: int
    scheduled: bool = Field(description="Whether the file declares a schedule.")


class WorkflowList(BaseModel):
    items: list[WorkflowOut]


class WorkflowGraph(BaseModel):
    """A workflow's nodes (id, type, name) and connections (from, to, branch), as its file declares them."""

    nodes: list[dict[str, Any]]
    connections: list[dict[str, Any]]


class WorkflowDetail(BaseModel):
    """A workflow file: its graph and layers, the inputs a caller may give, its schedule and latest runs."""

    id: str
    description: str
    layers: list[list[str]]
    graph: WorkflowGraph
    inputs: dict[str, Any] = Field(description="Each input the workflow reads, with its default (null: none; the "
                                               "trigger node's `defaults` give them).")
    schedule: ScheduleOut | None = Field(description="Its schedule; null when it has none.")
    latest_runs: list[RunOut]


class StatsQuery(_Query):
    """Query parameters of GET /api/v1/connectors/<id>/stats."""

    window: QueryInt = Field(50, ge=1, le=200, description="How many of the connector's newest runs.")


class RunPointOut(BaseModel):
    """One run of a connector's history, as its charts draw it."""

    run_id: str
    status: RunStatus
    backend: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None = Field(description="From start to end; null until the run ended.")
    rows: dict[str, int] = Field(description="Rows loaded per table (empty unless the run completed).")
    scheduled_for: datetime | None = Field(description="A scheduled run's slot; null for a caller's run.")
    fire_lag_seconds: float | None = Field(description="How long after its slot a scheduled run started.")


class ConnectorStats(BaseModel):
    """A connector's newest runs, oldest first, with what the window adds up to."""

    connector_id: str
    window: int = Field(description="How many runs were asked for; `runs` holds at most as many.")
    runs: list[RunPointOut]
    tables: list[str] = Field(description="Every table the runs loaded, in the order they first appear.")
    counts: dict[str, int] = Field(description="Runs in the window per status.")
    success_rate: float | None = Field(
        description="completed / (completed + failed + crashed) in the window: cancelled and unfinished runs "
                    "count for neither side; null when no run ended so.")

    @classmethod
    def of(cls, connector_id: str, window: int, points: list[RunPoint]) -> ConnectorStats:
        """Sum up the points of a window."""
        counts: dict[str, int] = {}
        tables: dict[str, None] = {}
        for point in points:
            counts[point.status] = counts.get(point.status, 0) + 1
            tables.update(dict.fromkeys(point.rows))
        ended = sum(counts.get(status, 0) for status in ("completed", "failed", "crashed"))
        return cls(connector_id=connector_id, window=window, tables=list(tables), counts=counts,
                   success_rate=round(counts.get("completed", 0) / ended, 4) if ended else None,
                   runs=[RunPointOut(run_id=p.id, status=p.status, backend=p.backend, created_at=p.created_at,
                                     started_at=p.started_at, finished_at=p.finished_at,
                                     duration_seconds=p.duration_seconds, rows=p.rows,
                                     scheduled_for=p.scheduled_for, fire_lag_seconds=p.fire_lag_seconds)
                         for p in points])


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
