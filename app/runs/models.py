"""Run store tables: every accepted run, its labels, callback, nodes and log lines, the executors that claim runs,
and the state of each schedule.

The node cache's table belongs to the workflow engine (flows/node_cache.py). The schema changes only through the
migrations in app/runs/migrations/ (a test checks that they end at exactly these tables)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Table, Text, TypeDecorator, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from flows.outcome import CANCELLING, RUNNING, TERMINAL

# A run callback's delivery: waiting (or being retried), done, or given up after the last attempt.
CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED = "pending", "delivered", "failed"


def utcnow() -> datetime:
    """Timezone-aware now, in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored without zone (SQLite has none) and always read back as UTC-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class Base(DeclarativeBase):
    """Declarative base of the run store."""

    if TYPE_CHECKING:  # each model maps one Table (DeclarativeBase types __table__ as any FromClause)
        __table__: ClassVar[Table]


# Active local runs, in SQL spelled once: the partial index below holds exactly these rows, and a query that says
# ACTIVE_LOCAL word for word reads only them (SQLite and PostgreSQL match a partial index's predicate as written;
# with bound parameters instead, SQLite's statistics of a store full of ended runs make it scan the table).
ACTIVE_LOCAL = text(f"status IN ('{RUNNING}', '{CANCELLING}') AND backend = 'local'")
# Runs of a schedule's slot; spelled once for the same reason (uq_runs_slot holds exactly these rows).
SCHEDULED = text("scheduled_for IS NOT NULL")
# Where a run came from: a trigger or execute, a schedule's slot, a rerun (of `rerun_of`), a workflow's connector node.
SOURCE_API, SOURCE_SCHEDULE, SOURCE_RERUN, SOURCE_WORKFLOW = "api", "schedule", "rerun", "workflow"
SOURCE_PREFECT = "prefect"  # a flow run someone started in Prefect (its UI, CLI or API), adopted by the gateway


class Run(Base):
    """One accepted trigger: the truth every GET reads, whichever process or backend runs it."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="connector")
    target: Mapped[str] = mapped_column(String(200))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16))
    backend: Mapped[str] = mapped_column(String(16))
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    prefect_state: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Runs with one key (one dlt pipeline, one DuckDB file) never execute at once.
    concurrency_key: Mapped[str] = mapped_column(String(512))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims, internal (callers see `attempt`)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(16), default=SOURCE_API, server_default=SOURCE_API)
    # A scheduled run's slot (the instant it was due) and the rule it came from, with how late it was created.
    scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime())
    schedule: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The W3C trace the run belongs to (connectors/tracing.py): its id, shown and logged, and the context the
    # run's spans, flow run, outbound calls and callback continue ({"traceparent": ..., "tracestate": ...}).
    trace_id: Mapped[str | None] = mapped_column(String(32))
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # Retries (connectors.failures.RetryPolicy): the policy in effect, this attempt's number, the attempts that
    # ended before it ({attempt, backend, started_at, ended_at, status, error}) and when this one may start.
    retry_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    attempt_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rerun_of: Mapped[str | None] = mapped_column(String(32))  # the run this one reruns (`source`: rerun)
    triggered_by: Mapped[str | None] = mapped_column(String(100))  # the API key's name; None: anonymous
    labels: Mapped[dict[str, str] | None] = mapped_column(JSON)  # also in run_labels, to find runs by one
    # Triggers that got this run for their own through their conflict policy (join, or queue_one finding it queued),
    # counted in the transaction that decided it (RunStore.create_run); the trigger that created it is not one.
    joined_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Loaded only where a run document is built (RunStore.get, list, cancel, the transitions): the claim and
    # finish paths, which hold SQLite's write lock, never pay for it. Not loaded reads as None.
    callback: Mapped[RunCallback | None] = relationship(lazy="noload", uselist=False)

    __table_args__ = (
        Index("ix_runs_created", "created_at", "id"),
        Index("ix_runs_queue", "status", "backend", "created_at", "id"),  # claims, recovery, every periodic query
        Index("ix_runs_target_status", "target", "kind", "status"),  # the queue limit counts per target
        # With years of history in the table, every periodic query and page reads an index, never the table:
        Index("ix_runs_finished", "finished_at"),  # retention
        Index("ix_runs_target_created", "target", "created_at", "id"),  # a connector's runs, newest first
        Index("ix_runs_status_created", "status", "created_at", "id"),  # runs in one status, newest first
        Index("ix_runs_target_finished", "target", "kind", "finished_at"),  # a target's last ended run
        Index("uq_runs_idempotency", "kind", "target", "idempotency_key", unique=True),
        # The database itself refuses a second active local run under one concurrency key.
        Index("uq_runs_one_active_per_key", "concurrency_key", unique=True,
              sqlite_where=ACTIVE_LOCAL, postgresql_where=ACTIVE_LOCAL),
        # One run per slot, whoever notices it (another process, another gateway): the database refuses a second.
        Index("uq_runs_slot", "kind", "target", "scheduled_for", unique=True,
              sqlite_where=SCHEDULED, postgresql_where=SCHEDULED),
        Index("ix_runs_source_created", "source", "created_at", "id"),  # /api/v1/runs?source=
    )

    @property
    def is_terminal(self) -> bool:
        """True once the run has ended, whatever the outcome."""
        return self.status in TERMINAL


class ScheduleState(Base):
    """A schedule as every gateway sees it: paused or not, and how far its slots are dealt with."""

    __tablename__ = "schedules"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    target: Mapped[str] = mapped_column(String(200), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    paused_by: Mapped[str | None] = mapped_column(String(200))
    # Every slot at or before this instant is dealt with (ran, skipped or missed); set to the moment the schedule
    # was first seen, and to the moment it was resumed: slots before those are never run.
    done_until: Mapped[datetime] = mapped_column(UTCDateTime())
    missed: Mapped[int] = mapped_column(Integer, default=0)  # passed while no gateway ran, not run (catch_up)
    skipped: Mapped[int] = mapped_column(Integer, default=0)  # came while a run of the schedule already waited
    last_skipped_for: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RunLabel(Base):
    """One label of a run (`tenant: acme`): one label's runs are read newest first from the index, on the same
    keyset cursor as every page of runs."""

    __tablename__ = "run_labels"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())  # the run's

    __table_args__ = (Index("ix_run_labels_key_value_created", "key", "value", "created_at", "run_id"),)


class RunJoin(Base):
    """A trigger that joined an active run (its conflict policy) under an Idempotency-Key: a retry of it finds the
    run by the key as a retried trigger finds the run it created, and is not counted as one more join."""

    __tablename__ = "run_joins"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    target: Mapped[str] = mapped_column(String(200), primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(32))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_run_joins_run", "run_id"),)  # pruned with their run


class Executor(Base):
    """A local executor (one per gateway process) and its last heartbeat: the shared view of capacity."""

    __tablename__ = "executors"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    slots: Mapped[int] = mapped_column(Integer)
    busy: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RunNode(Base):
    """One node of a workflow run, as the engine last reported it; any process can read a run's progress."""

    __tablename__ = "run_nodes"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RunCallback(Base):
    """Where to POST a run's document when it ends, and every delivery attempt so far."""

    __tablename__ = "run_callbacks"

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=CALLBACK_PENDING, index=True)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def to_dict(self) -> dict[str, Any]:
        """As the run document shows it: the URL without query string or credentials, which may hold secrets."""
        parts = urlsplit(self.url)
        shown = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        if parts.port:
            shown = shown.replace(parts.hostname or "", f"{parts.hostname}:{parts.port}", 1)
        return {"url": shown, "status": self.status, "attempts": list(self.attempts or [])}


class RunLog(Base):
    """A log line written while a local run executed (Prefect runs' lines stay in Prefect and are read from it)."""

    __tablename__ = "run_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    level: Mapped[str] = mapped_column(String(10))
    logger: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
