"""RunStore: runs in SQLite or PostgreSQL, their named transitions, atomic claims and leases, so any process can
run any run; the other concerns (callbacks, log lines, node states, the node cache, executors, a target's recent
runs as points to draw) hang off it as parts in modules of their own. Over 300 lines because every way a run's
row changes is here, side by side."""
from __future__ import annotations

import builtins
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Update, bindparam, exists, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, selectinload

from app.runs import migrate
from app.runs.callbacks import CallbackStore
from app.runs.executor_registry import ExecutorStore
from app.runs.history import RunHistory
from app.runs.log_lines import RunLogStore
from app.runs.models import (
    ACTIVE_LOCAL,
    CALLBACK_PENDING,
    SCHEDULED,
    SOURCE_API,
    Run,
    RunCallback,
    RunJoin,
    RunLabel,
    RunLog,
    utcnow,
)
from app.runs.node_states import RunNodeStore
from app.runs.retention import RetentionStore
from app.runs.schedule_states import ScheduleStore, advance
from connectors import tracing
from connectors.failures import RetryPolicy
from flows.connector_lock import connector_locks, held_by_others, serialise_claims
from flows.database import Database, rowcount
from flows.node_cache import SqlNodeCache
from flows.outcome import ACTIVE, CANCELLED, CANCELLING, CRASHED, FAILED, QUEUED, RUNNING, TERMINAL, RunError

# Plain SQL on purpose: this runs inside every trigger's write transaction, where each 0.1 ms holds SQLite's
# one write lock for every other writer (the ORM query took 5x as long). Covered by ix_runs_target_status.
_COUNT_QUEUED_SQLITE = f"SELECT count(*) FROM runs WHERE target = ? AND kind = ? AND status = '{QUEUED}'"
_COUNT_QUEUED_PG = f"SELECT count(*) FROM runs WHERE target = %(target)s AND kind = %(kind)s AND status = '{QUEUED}'"
# An inline workflow run's concurrency_key starts with this. Its caller picks the id at will, so the queue limit
# counts every queued inline run as one target's: a new id per trigger got past the limit (security review L3).
INLINE_WORKFLOW_KEY = "inline-workflow:"
_COUNT_QUEUED_INLINE = (f"SELECT count(*) FROM runs WHERE status = '{QUEUED}' AND kind = 'workflow' "
                        f"AND substr(concurrency_key, 1, {len(INLINE_WORKFLOW_KEY)}) = '{INLINE_WORKFLOW_KEY}'")
# A target's queued and running runs, newest first (ix_runs_target_status), for its conflict policy.
_ACTIVE_OF_TARGET = (f"SELECT id, status FROM runs WHERE target = {{target}} AND kind = {{kind}} "
                     f"AND status IN ('{QUEUED}', '{RUNNING}') ORDER BY created_at DESC, id DESC")
_ACTIVE_SQLITE = _ACTIVE_OF_TARGET.format(target="?", kind="?")
_ACTIVE_PG = _ACTIVE_OF_TARGET.format(target="%(target)s", kind="%(kind)s")
_COUNT_JOIN = update(Run).where(Run.id == bindparam("run_id")).values(joined_count=Run.joined_count + 1)
_WITH_CALLBACK = (selectinload(Run.callback),)
# The statuses of a run that has not ended, named rather than "not terminal": an IN over them reads ix_runs_queue
# and touches only the few live rows, where NOT IN scans every run ever kept.
_UNFINISHED = (QUEUED, *ACTIVE)
_INSERT_RUN = Run.__table__.insert()
_INSERT_CALLBACK = RunCallback.__table__.insert()
_INSERT_LABEL = RunLabel.__table__.insert()
_EMPTY_ROW = {column.name: None for column in Run.__table__.columns}
_FIND_BY_KEY = select(Run.id).where(Run.kind == bindparam("kind"), Run.target == bindparam("target"),
                                    Run.idempotency_key == bindparam("key"))
_FIND_JOIN_BY_KEY = select(RunJoin.run_id, RunJoin.request_hash).where(
    RunJoin.kind == bindparam("kind"), RunJoin.target == bindparam("target"),
    RunJoin.idempotency_key == bindparam("key"))
_INSERT_JOIN = RunJoin.__table__.insert()
# A run's end is tried this often: waits of 0.1 s doubling, 3.1 s in all, well inside a lease (30 s by default),
# which the executor's heartbeat keeps renewing until the end is written.
_END_TRIES = 6
_QUEUE_LOCK_NAMESPACE = 0x666C6F71  # with a hash of kind:target, the advisory lock of one target's queue limit
_RETRYABLE = ("transient", "crashed")  # failure classes a policy may retry (connectors.failures)


def _due(now: datetime) -> Any:
    """A queued run that may start now: a first attempt, or a retry whose wait is over."""
    return or_(Run.next_attempt_at.is_(None), Run.next_attempt_at <= now)


# What became of a schedule's slot (RunStore.create_slot_run).
CREATED, SKIPPED, WAITING, TAKEN = "created", "skipped", "waiting", "taken"
# A run of the schedule that has not started yet: the one that may wait behind a running one (ix_runs_target_status).
_WAITING_SLOT_RUN = select(Run.id).where(Run.kind == bindparam("kind"), Run.target == bindparam("target"),
                                         Run.status == QUEUED, SCHEDULED).limit(1)


class QueueFull(Exception):
    """The target (every inline workflow counts as one) already has `limit` queued runs."""

    def __init__(self, new: NewRun, limit: int):
        super().__init__(f"inline workflows (counted as one target) already have {limit} queued runs"
                         if new.is_inline_workflow else f"{new.kind} '{new.target}' already has {limit} queued runs")
        self.limit = limit


class TargetBusy(Exception):
    """The target has a queued or running run, and the trigger's conflict policy (`skip`, `reject`) starts none."""

    def __init__(self, kind: str, target: str, run_id: str, policy: str):
        super().__init__(f"{kind} '{target}' already has an active run ({run_id}); on_conflict: {policy}")
        self.run_id = run_id
        self.policy = policy


# How a trigger's run came (RunStore.store_run).
STORED_NEW, STORED_BY_KEY, JOINED, REJOINED = "new", "by_key", "joined", "rejoined"


class IdempotencyConflict(Exception):
    """An Idempotency-Key was used before with a different request."""

    def __init__(self, run_id: str):
        super().__init__(f"idempotency key already used by run {run_id} with a different request")
        self.run_id = run_id


@dataclass(frozen=True)
class NewRun:
    """What a trigger asks for, validated, before it becomes a row."""

    kind: str
    target: str
    params: dict[str, Any]
    backend: str
    concurrency_key: str
    fallback_reason: str | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None
    max_queued: int | None = None  # refuse (QueueFull) when the target already has this many queued runs
    source: str = SOURCE_API
    scheduled_for: datetime | None = None  # a schedule's slot: at most one run per (kind, target, slot)
    schedule: dict[str, Any] | None = None  # the rule the slot came from, and how late its run was created
    trace_context: dict[str, str] | None = None  # the W3C context the run continues (connectors/tracing.py)
    retry: RetryPolicy | None = None  # None: a failure ends the run
    # When the target has a queued or running run: queue behind it, join it (the newest), skip, reject, or keep at
    # most one queued behind the running one (queue_one: later triggers join the queued one).
    on_conflict: str = "queue"
    rerun_of: str | None = None  # with source `rerun`
    triggered_by: str | None = None  # the API key's name
    labels: dict[str, str] | None = None
    prefect_flow_run_id: str | None = None  # an adopted flow run's: the run exists because the flow run does

    @property
    def trace_id(self) -> str | None:
        """The trace id `trace_context` names."""
        return tracing.trace_id_of(self.trace_context)

    @property
    def is_inline_workflow(self) -> bool:
        """A workflow run of a definition given in the request, not of a workflow file."""
        return self.kind == "workflow" and self.concurrency_key.startswith(INLINE_WORKFLOW_KEY)

    @property
    def queue(self) -> str:
        """What the queue limit counts under: the target, or one name for every inline workflow."""
        return "workflow:(inline)" if self.is_inline_workflow else f"{self.kind}:{self.target}"

    @property
    def request_hash(self) -> str:
        """A fingerprint of the request, to tell a retry from a different call under the same key."""
        # What was added later counts only when given, so the runs stored before it counted keep their hash.
        request = [self.kind, self.target, self.params] + ([self.callback_url] if self.callback_url else [])
        if self.retry is not None:
            request.append({"retry": self.retry.model_dump(mode="json")})
        if self.labels:
            request.append({"labels": self.labels})
        body = json.dumps(request, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()


def _row(new: NewRun, now: datetime) -> dict[str, Any]:
    """The runs row of a new queued run."""
    return {**_EMPTY_ROW, "id": uuid.uuid4().hex, "kind": new.kind, "target": new.target, "params": new.params,
            "status": QUEUED, "backend": new.backend, "fallback_reason": new.fallback_reason,
            "idempotency_key": new.idempotency_key, "request_hash": new.request_hash,
            "concurrency_key": new.concurrency_key, "cancel_requested": False, "attempts": 0, "created_at": now,
            "source": new.source, "scheduled_for": new.scheduled_for, "schedule": new.schedule,
            "trace_id": new.trace_id, "trace_context": new.trace_context,
            "attempt": 1, "retry_policy": new.retry.model_dump(mode="json") if new.retry else None,
            "rerun_of": new.rerun_of, "triggered_by": new.triggered_by, "labels": new.labels or None,
            "prefect_flow_run_id": new.prefect_flow_run_id, "joined_count": 0}


def _insert(connection: Connection, new: NewRun, row: dict[str, Any]) -> Run:
    """Insert the run and its callback in the caller's transaction: a run never exists without its callback."""
    connection.execute(_INSERT_RUN, row)
    if new.labels:
        connection.execute(_INSERT_LABEL, [{"run_id": row["id"], "key": key, "value": value,
                                            "created_at": row["created_at"]} for key, value in new.labels.items()])
    callback = None
    if new.callback_url:
        callback = {"run_id": row["id"], "url": new.callback_url, "status": CALLBACK_PENDING, "attempts": [],
                    "next_attempt_at": row["created_at"], "claimed_by": None, "claimed_until": None}
        connection.execute(_INSERT_CALLBACK, callback)
    # The answer's Run is built as the ORM builds a loaded one, straight into its __dict__: the constructor's 34
    # instrumented attribute sets were 6% of a trigger's CPU (cProfile, 2026-12-03). It is never added to a session.
    run = Run.__mapper__.class_manager.new_instance()
    run.__dict__.update(row)
    if callback:
        run.callback = RunCallback(**callback)
    else:
        run.__dict__["callback"] = None
    return run


class RunStore:
    """Reads and writes runs; every state change is one short transaction."""

    # In this class's annotations `list` is the method RunStore.list: the type is spelled builtins.list.

    def __init__(self, url: str, busy_timeout_ms: int = 15_000):
        self.db = Database(url, busy_timeout_ms)
        self.is_sqlite = self.db.is_sqlite
        self.engine = self.db.engine
        self.callbacks = CallbackStore(self.db)
        self.logs = RunLogStore(self.db)
        self.nodes = RunNodeStore(self.db)
        self.node_cache = SqlNodeCache(self.db)
        self.executors = ExecutorStore(self.db)
        self.retention = RetentionStore(self.db)
        self.schedules = ScheduleStore(self.db)
        self.history = RunHistory(self.db)

    def create_schema(self) -> None:
        """Apply the pending migrations (the node cache's table too) under a lock: safe from every process at once."""
        migrate.upgrade(self.db)

    def dispose(self) -> None:
        """Close pooled connections (after a fork, or at exit)."""
        self.db.dispose()

    def ping(self) -> float:
        """Round-trip one query; returns the latency in milliseconds (raises when the database is down)."""
        return self.db.ping()

    # --- runs -------------------------------------------------------------------------------

    def create_run(self, new: NewRun) -> tuple[Run, bool]:
        """Insert a queued run; with an idempotency key already used, return that run instead (created=False), and
        so for an active run its conflict policy joins. TargetBusy when it skips or rejects."""
        run, how = self.store_run(new)
        return run, how == STORED_NEW

    def store_run(self, new: NewRun) -> tuple[Run, str]:
        """`create_run`, saying how the run came: STORED_NEW, STORED_BY_KEY (an earlier trigger's with the same
        idempotency key), JOINED (its conflict policy joined an active run) or REJOINED (a join retried with its
        key: the run it joined, counted once)."""

        # Core statements on one connection, no ORM session: this is every trigger's write transaction, and on
        # SQLite it holds the one write lock; the ORM's unit of work cost 1.3 ms of CPU per trigger here.
        def attempt() -> tuple[Run | str, str]:
            row = _row(new, utcnow())
            with self.db.writer.begin() as connection:
                if new.idempotency_key:
                    existing = connection.execute(_FIND_BY_KEY, {"kind": new.kind, "target": new.target,
                                                                 "key": new.idempotency_key}).scalar()
                    if existing is not None:
                        return existing, STORED_BY_KEY
                if new.max_queued is not None or new.on_conflict != "queue":
                    self._lock_target(connection, new)
                if new.on_conflict != "queue":
                    if rejoined := self._join_of_key(connection, new):
                        return rejoined, REJOINED
                    if joined := self._resolve_conflict(connection, new):
                        return joined, JOINED
                if new.max_queued is not None and self._count_queued(connection, new) >= new.max_queued:
                    raise QueueFull(new, new.max_queued)
                run = _insert(connection, new, row)
            return run, STORED_NEW

        try:
            found, how = self.db.retry(attempt)
        except IntegrityError:
            # Another process inserted the same key between our check and our insert.
            with self.db.session() as session:
                by_key = self._by_idempotency_key(session, new)
            if by_key is None:
                raise  # not the key's (nothing else of a new run is unique): the error as it was
            found, how = by_key, STORED_BY_KEY
        run = found if isinstance(found, Run) else self.get_one(found)
        if how == STORED_BY_KEY and run.request_hash != new.request_hash:
            raise IdempotencyConflict(run.id)
        return run, how

    def _lock_target(self, connection: Connection, new: NewRun) -> None:
        """Until this transaction ends, no concurrent trigger of the new run's target can add a run: SQLite's one
        write lock is held already; PostgreSQL takes an advisory lock per target (triggers of other targets pass),
        and each statement after it reads a fresh snapshot that sees the last holder's insert."""
        if not self.is_sqlite:
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%(ns)s, hashtext(%(key)s))",
                                       {"ns": _QUEUE_LOCK_NAMESPACE, "key": new.queue})

    def _count_queued(self, connection: Connection, new: NewRun) -> int:
        """Queued runs of the new run's target, or of every inline workflow (under _lock_target)."""
        if new.is_inline_workflow:
            return connection.exec_driver_sql(_COUNT_QUEUED_INLINE).scalar_one()
        if self.is_sqlite:
            return connection.exec_driver_sql(_COUNT_QUEUED_SQLITE, (new.target, new.kind)).scalar_one()
        return connection.exec_driver_sql(_COUNT_QUEUED_PG, {"target": new.target, "kind": new.kind}).scalar_one()

    def create_slot_run(self, new: NewRun, done_until: datetime, skip_if_waiting: bool) -> tuple[str, Run | None]:
        """The run of a schedule's slot (`new.scheduled_for`), created at most once whoever asks, with what
        happened: CREATED (and the run), SKIPPED (a run of the schedule already waits: the slot is counted on
        the schedule, no run), WAITING (one waits and the slot is to run after it: nothing changed) or TAKEN
        (another process dealt with the slot, or the schedule is paused).

        `done_until` is the schedule's progress as the caller read it. The run is inserted in the transaction
        that moves the progress from there to the slot, and uq_runs_slot refuses a second run of the slot
        whatever the progress says (a progress set back by a resume on a host whose clock is behind)."""
        slot = new.scheduled_for
        assert slot is not None and new.source != SOURCE_API

        def attempt() -> tuple[str, Run | None]:
            with self.db.writer.connect() as connection:
                with connection.begin() as transaction:
                    waiting = connection.execute(_WAITING_SLOT_RUN, {"kind": new.kind, "target": new.target}).first()
                    if waiting and not skip_if_waiting:
                        return WAITING, None
                    if not advance(connection, new.kind, new.target, done_until, slot, skipped=bool(waiting)):
                        transaction.rollback()
                        return TAKEN, None
                    if waiting:
                        return SKIPPED, None
                    return CREATED, _insert(connection, new, _row(new, utcnow()))

        try:
            return self.db.retry(attempt)
        except IntegrityError:  # the slot has its run already: only its progress is behind
            def catch_up() -> None:
                with self.db.writer.begin() as connection:
                    advance(connection, new.kind, new.target, done_until, slot)

            self.db.retry(catch_up)
            return TAKEN, None
    def _resolve_conflict(self, connection: Connection, new: NewRun) -> str | None:
        """Under _lock_target: the id of the active run the trigger joins, its joined_count counted in the same
        transaction; None to insert one; TargetBusy to start none (skip, reject)."""
        active = (connection.exec_driver_sql(_ACTIVE_SQLITE, (new.target, new.kind)) if self.is_sqlite else
                  connection.exec_driver_sql(_ACTIVE_PG, {"target": new.target, "kind": new.kind})).all()
        if not active:
            return None
        if new.on_conflict == "join":
            joined = active[0].id
        elif new.on_conflict == "queue_one":
            joined = next((row.id for row in active if row.status == QUEUED), None)
        else:
            raise TargetBusy(new.kind, new.target, active[0].id, new.on_conflict)
        if joined is not None:
            connection.execute(_COUNT_JOIN, {"run_id": joined})
            if new.idempotency_key:  # its retry finds the run by the key (_join_of_key), not joining it once more
                connection.execute(_INSERT_JOIN, {"kind": new.kind, "target": new.target, "run_id": joined,
                                                  "idempotency_key": new.idempotency_key,
                                                  "request_hash": new.request_hash, "created_at": utcnow()})
        return joined

    @staticmethod
    def _join_of_key(connection: Connection, new: NewRun) -> str | None:
        """Under _lock_target: the run an earlier trigger with the new one's Idempotency-Key joined (its retry,
        answered with that run again); IdempotencyConflict when the key came with another request."""
        if not new.idempotency_key:
            return None
        join = connection.execute(_FIND_JOIN_BY_KEY, {"kind": new.kind, "target": new.target,
                                                      "key": new.idempotency_key}).first()
        if join is None:
            return None
        if join.request_hash != new.request_hash:
            raise IdempotencyConflict(join.run_id)
        return str(join.run_id)

    def start_inline(self, new: NewRun, owner: str, lease_seconds: float) -> Run | None:
        """Insert a run already `running` and held by `owner` (a connector node runs it in its own thread).

        None while another run holds its concurrency key: an active local run (the database refuses the second,
        as for claims) or a Prefect flow run's lock (flows/connector_lock.py).
        """

        def attempt() -> Run | None:
            with self.db.session(write=True) as session:
                serialise_claims(session, self.is_sqlite)
                if session.execute(held_by_others(session, self.is_sqlite)
                                   .where(connector_locks.c.key == new.concurrency_key)).first():
                    return None
                now = self._now(session)
                run = Run(id=uuid.uuid4().hex, kind=new.kind, target=new.target, params=new.params, status=RUNNING,
                          source=new.source, triggered_by=new.triggered_by, labels=new.labels or None,
                          backend=new.backend, fallback_reason=new.fallback_reason, request_hash=new.request_hash,
                          concurrency_key=new.concurrency_key, created_at=now, started_at=now, attempts=1,
                          lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                          trace_id=new.trace_id, trace_context=new.trace_context)
                session.add(run)
                session.add_all(RunLabel(run_id=run.id, key=key, value=value, created_at=now)
                                for key, value in (new.labels or {}).items())
            return run

        try:
            return self.db.retry(attempt)
        except IntegrityError:
            return None

    @staticmethod
    def _by_idempotency_key(session: Session, new: NewRun) -> Run | None:
        return session.scalars(select(Run).options(*_WITH_CALLBACK).where(
            Run.kind == new.kind, Run.target == new.target, Run.idempotency_key == new.idempotency_key)).first()

    def keys_taken(self, kind: str, keyed: list[tuple[str, str]]) -> set[str]:
        """Which of the (target, idempotency key) pairs of `kind` a run already has (read through the unique index
        of idempotency keys)."""
        if not keyed:
            return set()
        with self.db.session() as session:
            return set(session.scalars(select(Run.idempotency_key).where(
                Run.kind == kind, Run.target.in_({target for target, _ in keyed}),
                Run.idempotency_key.in_({key for _, key in keyed}))))

    def get_one(self, run_id: str) -> Run:
        """A run known to exist (one a transaction just wrote or saw); NoResultFound otherwise."""
        with self.db.session() as session:
            return session.get_one(Run, run_id, options=_WITH_CALLBACK)

    def get(self, run_id: str) -> Run | None:
        """The run with this id, or None."""
        with self.db.session() as session:
            return session.get(Run, run_id, options=_WITH_CALLBACK)

    def list(self, target: str | None = None, status: str | None = None, limit: int = 50,
             before: tuple[datetime, str] | None = None, backend: str | None = None,
             source: str | None = None, kind: str | None = None,
             labels: Sequence[tuple[str, str]] = ()) -> builtins.list[Run]:
        """Runs newest first; `before` is the (created_at, id) of the last run of the previous page. With `labels`
        ((key, value) pairs, every one a run must have), the first label's index gives the order, and the other
        labels and filters are checked on the runs it names. SQLite checks them run by run, so a page costs the
        first label's runs read until it is full (the rarest first reads fewest); PostgreSQL's planner hashes the
        other labels' runs instead, reading the commoner label's index through (docs/benchmarks.md, measured)."""
        created_at, run_id = (RunLabel.created_at, RunLabel.run_id) if labels else (Run.created_at, Run.id)
        query = select(Run).options(*_WITH_CALLBACK).order_by(created_at.desc(), run_id.desc()).limit(limit)
        if labels:
            (key, value), *others = labels
            query = query.join(RunLabel, RunLabel.run_id == Run.id).where(RunLabel.key == key, RunLabel.value == value)
            for key, value in others:  # each a lookup of run_labels' primary key (run_id, key)
                other = aliased(RunLabel)
                query = query.where(exists().where(other.run_id == RunLabel.run_id, other.key == key,
                                                   other.value == value))
        if target:
            query = query.where(Run.target == target)
        if kind:
            query = query.where(Run.kind == kind)
        if status:
            query = query.where(Run.status == status)
        if backend:
            query = query.where(Run.backend == backend)
        if source:
            query = query.where(Run.source == source)
        if before:
            query = query.where((created_at < before[0]) | ((created_at == before[0]) & (run_id < before[1])))
        with self.db.session() as session:
            return list(session.scalars(query))

    def recent_durations(self, kind: str, target: str, count: int = 10) -> builtins.list[float]:
        """Seconds from start to end of the target's last `count` ended runs that started (ix_runs_target_finished)."""
        with self.db.session() as session:
            rows = session.execute(select(Run.started_at, Run.finished_at).where(
                Run.target == target, Run.kind == kind, Run.finished_at.is_not(None))
                .order_by(Run.finished_at.desc()).limit(count)).all()
        return [(row.finished_at - row.started_at).total_seconds() for row in rows if row.started_at]

    def fail_overdue(self, backend: str, started_before: datetime, error: RunError) -> builtins.list[Run]:
        """End as failed every unfinished run on `backend` that started before `started_before` (one that has not
        started, created before it); returns them. Waiting behind the connector's other runs does not count."""

        def attempt() -> list[Run]:
            with self.db.session(write=True) as session:
                # One UPDATE: its WHERE is checked against each row as it is when written, so a run that ended
                # meanwhile (its completion just recorded) keeps its end.
                return list(session.scalars(update(Run).where(
                    Run.backend == backend, Run.status.in_(_UNFINISHED),
                    func.coalesce(Run.started_at, Run.next_attempt_at, Run.created_at) < started_before)
                    .values(status=FAILED, finished_at=utcnow(), error=error.to_dict(), lease_expires_at=None)
                    .returning(Run)))

        return self.db.retry(attempt)

    def last_ended_with(self, code: str, since: datetime) -> Run | None:
        """The latest run that ended with error `code` since `since` (a range of ix_runs_finished), or None."""
        with self.db.session() as session:
            return session.scalars(select(Run).where(Run.finished_at >= since, Run.error["code"].as_string() == code)
                                   .order_by(Run.finished_at.desc()).limit(1)).first()

    def count_by_status(self) -> dict[str, int]:
        """How many local runs are in each status that has not ended (queued, running, cancelling)."""
        with self.db.session() as session:
            rows = session.execute(select(Run.status, func.count()).where(
                Run.status.in_(_UNFINISHED), Run.backend == "local").group_by(Run.status))
            return {status: count for status, count in rows}

    def claim_next(self, owner: str, lease_seconds: float, kinds: tuple[str, ...] | None = None,
                   scheduled_only: bool = False) -> Run | None:
        """Atomically take the oldest queued local run (of `kinds`, default any; only a schedule's with
        `scheduled_only`) whose concurrency key is free, a scheduled one before any triggered; None when there is
        none."""

        def attempt() -> Run | None:
            with self.db.session(write=True) as session:
                serialise_claims(session, self.is_sqlite)
                while True:
                    now = self._now(session)
                    busy_keys = select(Run.concurrency_key).where(ACTIVE_LOCAL)  # uq_runs_one_active_per_key
                    run_id = session.scalars(
                        select(Run.id)
                        .where(Run.status == QUEUED, Run.backend == "local", Run.concurrency_key.not_in(busy_keys),
                               Run.concurrency_key.not_in(held_by_others(session, self.is_sqlite)),
                               _due(now), *((Run.kind.in_(kinds),) if kinds is not None else ()),
                               *((Run.scheduled_for.is_not(None),) if scheduled_only else ()))
                        # A schedule's slot first (its time is the promise; at most one per schedule waits),
                        # then the oldest.
                        .order_by(Run.scheduled_for.is_(None), Run.created_at, Run.id)
                        .limit(1)
                    ).first()
                    if run_id is None:
                        return None
                    # Still queued? A cancel (which does not take the claim lock) may have ended it since the read:
                    # then the next one is looked for.
                    lease_expires_at = now + timedelta(seconds=lease_seconds)
                    run = session.scalars(
                        self._when(run_id, QUEUED, Run.backend == "local")
                        .values(status=RUNNING, lease_owner=owner, lease_expires_at=lease_expires_at, started_at=now,
                                attempts=Run.attempts + 1)
                        .returning(Run)).first()
                    if run is not None:
                        return run

        return self.db.retry(attempt)

    def renew_leases(self, owner: str, run_ids: builtins.list[str],
                     lease_seconds: float) -> tuple[set[str], set[str]]:
        """Extend the leases `owner` still holds: returns (the ids it holds, those among them asked to cancel).
        An id missing from the first set was taken from `owner` (recovered as crashed): it must stop."""
        if not run_ids:
            return set(), set()

        def attempt() -> tuple[set[str], set[str]]:
            with self.db.session(write=True) as session:
                now = self._now(session)
                session.execute(update(Run).where(Run.id.in_(run_ids), Run.lease_owner == owner,
                                                  Run.status.in_(ACTIVE))
                                .values(lease_expires_at=now + timedelta(seconds=lease_seconds)))
                held = session.execute(select(Run.id, Run.cancel_requested).where(
                    Run.id.in_(run_ids), Run.lease_owner == owner, Run.status.in_(ACTIVE))).all()
                return {row.id for row in held}, {row.id for row in held if row.cancel_requested}

        return self.db.retry(attempt)

    def _now(self, session: Session) -> datetime:
        """The database's clock (leases are compared across hosts); this host's for SQLite, a local file."""
        if self.is_sqlite:
            return utcnow()
        return session.execute(text("SELECT clock_timestamp()")).scalar_one()  # now(): the transaction's start

    @staticmethod
    def _when(run_id: str, status: str | tuple[str, ...], *also: Any) -> Update:
        """An UPDATE of the run that changes it only while its status is still `status` (what the caller read).

        Every transition is such a compare-and-set (its rowcount says whether it happened): on PostgreSQL, at READ
        COMMITTED, a row read, changed in Python and written back by id alone overwrites any change committed in
        between (a finish, a claim, a cancel), where this WHERE is checked against the row as it is then."""
        statuses = (status,) if isinstance(status, str) else status
        return update(Run).where(Run.id == run_id, Run.status.in_(statuses), *also).execution_options(
            synchronize_session=False)

    def finish(self, run_id: str, owner: str, status: str, result: dict[str, Any] | None = None,
               error: RunError | None = None, logs: builtins.list[dict[str, Any]] | None = None) -> str | None:
        """Record how a run's attempt ended (and its last log lines, in the same transaction); only while `owner`
        still holds it (a recovered run stays recovered). Returns the status written: `status`, or `queued` when its
        retry policy takes the failure (_end_attempt); None when the run was no longer `owner`'s. Tried again after
        a transient error (a dropped connection, a failover): given up, a run that completed would be recorded
        crashed once its lease lapsed."""
        tries = 0

        def attempt() -> str | None:
            nonlocal tries
            tries += 1
            with self.db.session(write=True) as session:
                written = self._end_attempt(session, run_id, ACTIVE, status, result, error, Run.lease_owner == owner,
                                            logs=logs, log_error=status in (FAILED, CRASHED))
                if written is None and tries > 1:  # the try before may have committed, its answer lost with it
                    written = status if session.scalar(select(func.count()).where(
                        Run.id == run_id, Run.lease_owner == owner, Run.status == status,
                        Run.lease_expires_at.is_(None))) else None
            return written

        return self.db.retry(attempt, attempts=_END_TRIES, transient=True, first_wait=0.1)

    def _end_attempt(self, session: Session, run_id: str, statuses: tuple[str, ...], status: str,
                     result: dict[str, Any] | None, error: RunError | None, *also: Any,
                     now: datetime | None = None, log_error: bool = False,
                     logs: builtins.list[dict[str, Any]] | None = None, **ended: Any) -> str | None:
        """End the run's current attempt as `status` (a compare-and-set on `statuses` and `also`); returns the status
        written, None when the run had moved on.

        A failure of a class the run's retry policy takes, with attempts left, does not end the run: the attempt
        goes to the run's `attempt_log` and the run back to `queued` under the same id, to be claimed (or handed to
        Prefect) no earlier than `next_attempt_at`. The run never passes through an ended status on the way, so its
        callback fires once, after the last attempt. A run someone asked to cancel is not retried.

        `logs` are written before its own lines (an ERROR line with `log_error`, a WARNING naming the next attempt),
        `ended` only when the run ends."""
        now = now or utcnow()
        values: dict[str, Any] = {"status": status, "result": result, "error": error.to_dict() if error else None,
                                  "finished_at": now, "lease_expires_at": None, **ended}
        retry_line = None
        if status in (FAILED, CRASHED) and error is not None and error.failure_class in _RETRYABLE:
            row = session.execute(select(Run.retry_policy, Run.attempt, Run.attempt_log, Run.backend, Run.started_at,
                                         Run.cancel_requested, Run.prefect_flow_run_id)
                                  .where(Run.id == run_id)).first()
            policy = RetryPolicy.model_validate(row.retry_policy) if row is not None and row.retry_policy else None
            if (row is not None and policy is not None and not row.cancel_requested
                    and policy.retries(error.failure_class, row.attempt)):
                entry = {"attempt": row.attempt, "backend": row.backend, "status": status, "error": values["error"],
                         "started_at": row.started_at.isoformat() if row.started_at else None,
                         "ended_at": now.isoformat(), "prefect_flow_run_id": row.prefect_flow_run_id}
                next_at = now + timedelta(seconds=policy.delay_after(row.attempt))
                values = {"status": QUEUED, "attempt": row.attempt + 1, "next_attempt_at": next_at,
                          "attempt_log": [*(row.attempt_log or []), entry], "started_at": None, "finished_at": None,
                          "lease_owner": None, "lease_expires_at": None, "result": None, "error": None,
                          "prefect_flow_run_id": None, "prefect_state": None}
                also = (*also, Run.attempt == row.attempt)
                retry_line = (f"attempt {row.attempt} of {policy.max_attempts} ended {status} "
                              f"({error.failure_class}); attempt {row.attempt + 1} starts at {next_at.isoformat()}")
        if not rowcount(session.execute(self._when(run_id, statuses, *also).values(**values))):
            return None
        lines = [RunLog(**line) for line in logs or ()]
        if log_error and error is not None:
            lines.append(RunLog(run_id=run_id, at=now, level="ERROR", logger="flowgate.runs", message=error.describe()))
        if retry_line:
            lines.append(RunLog(run_id=run_id, at=now, level="WARNING", logger="flowgate.runs", message=retry_line))
        session.add_all(lines)
        return values["status"]

    # --- transitions of a run that has not ended (None when it had ended meanwhile) ---------------

    def record_flow_run(self, run_id: str, flow_run_id: str, prefect_state: str | None) -> Run | None:
        """Prefect created the run's flow run."""
        return self._change_unfinished(run_id, "prefect", prefect_flow_run_id=flow_run_id, prefect_state=prefect_state)

    def fall_back_to_local(self, run_id: str, reason: str, prefect_state: str | None = None) -> Run | None:
        """Prefect could not take the run after all: a local executor will claim it, under the same id (a flow
        run Prefect had for it stays named on the run, with its last state)."""
        values = {"prefect_state": prefect_state} if prefect_state else {}
        # Only a queued one: local executors claim queued runs, and one a worker had started must stay on Prefect.
        # Only an unleased one: a flow run that took its run's lease (flows/run_lease.py) executes it, and the
        # lease is the fence, whatever Prefect says (it accepts RUNNING over CANCELLED).
        return self._change_unfinished(run_id, "prefect", (QUEUED,), (Run.lease_owner.is_(None),), backend="local",
                                       fallback_reason=reason, **values)

    def end_lapsed_flow_run(self, run_id: str, owner: str, error: RunError, status: str = CRASHED) -> Run | None:
        """End as `status` (crashed, or cancelled for a run asked to cancel; a crash its retry policy takes queues
        the next attempt) a Prefect run whose flow run took its lease as `owner` and let it lapse: that flow run's
        process is gone (flows/run_lease.py). Only while the lease is still `owner`'s and lapsed, by the database's
        clock. The run as written, or None."""

        def attempt() -> Run | None:
            with self.db.session(write=True) as session:
                now = self._now(session)
                written = self._end_attempt(session, run_id, _UNFINISHED, status, None, error,
                                            Run.backend == "prefect", Run.lease_owner == owner,
                                            Run.lease_expires_at < now, now=now, log_error=status == CRASHED,
                                            prefect_state=status.capitalize())
                return session.get(Run, run_id, options=_WITH_CALLBACK) if written else None

        return self.db.retry(attempt)

    def fail(self, run_id: str, error: RunError) -> Run | None:
        """End the run as failed before it ran anywhere."""
        return self._change_unfinished(run_id, "prefect", status=FAILED, finished_at=utcnow(), error=error.to_dict())

    def record_prefect_state(self, run_id: str, status: str, prefect_state: str | None,
                             started_at: datetime | None = None, finished_at: datetime | None = None,
                             result: dict[str, Any] | None = None, error: RunError | None = None) -> Run | None:
        """A Prefect run's new state (and, once it ended, its result or error)."""
        values: dict[str, Any] = {"status": status, "prefect_state": prefect_state}
        if started_at:
            values["started_at"] = started_at
        if not finished_at:
            return self._change_unfinished(run_id, "prefect", **values)

        def attempt() -> Run | None:  # the end of an attempt: perhaps a retry (_end_attempt)
            with self.db.session(write=True) as session:
                if started_at:
                    session.execute(self._when(run_id, _UNFINISHED, Run.backend == "prefect")
                                    .values(started_at=started_at))
                written = self._end_attempt(session, run_id, _UNFINISHED, status, result, error,
                                            Run.backend == "prefect", now=finished_at, prefect_state=prefect_state)
                return session.get(Run, run_id, options=_WITH_CALLBACK) if written else None

        return self.db.retry(attempt)

    def _change_unfinished(self, run_id: str, on_backend: str, statuses: tuple[str, ...] = _UNFINISHED,
                           also: tuple[Any, ...] = (), **values: Any) -> Run | None:
        # Only while the run is still on `on_backend`, in one of `statuses` (and `also` holds): a Prefect answer
        # read before the run went local must not touch it once a local executor may hold it, nor reopen a run
        # that ended.
        def attempt() -> Run | None:
            with self.db.session(write=True) as session:
                changed = session.execute(self._when(run_id, statuses, Run.backend == on_backend, *also)
                                          .values(**values))
                if not rowcount(changed):
                    return None
                return session.get(Run, run_id, options=_WITH_CALLBACK)

        return self.db.retry(attempt)

    def undispatched(self, backend: str, created_before: datetime, limit: int = 50) -> builtins.list[Run]:
        """Queued runs on `backend` (Prefect) with no flow run on record yet, created before `created_before`."""
        with self.db.session() as session:
            return list(session.scalars(select(Run).where(
                Run.status == QUEUED, Run.backend == backend, Run.prefect_flow_run_id.is_(None),
                or_(Run.created_at < created_before, Run.attempt > 1), _due(utcnow()))
                .order_by(Run.created_at).limit(limit)))

    def unfinished(self, backend: str, limit: int = 100) -> builtins.list[Run]:
        """Runs on `backend` that have not ended, oldest first."""
        # One ordered range of ix_runs_queue per status: an IN with ORDER BY tempts planners into walking
        # ix_runs_created, every run ever kept, to skip a sort of the few live ones.
        with self.db.session() as session:
            runs = [run for status in _UNFINISHED for run in session.scalars(
                select(Run).where(Run.status == status, Run.backend == backend)
                .order_by(Run.created_at, Run.id).limit(limit))]
        return sorted(runs, key=lambda run: (run.created_at, run.id))[:limit]

    def cancel(self, run_id: str) -> Run | None:
        """Cancel a queued run at once; ask a running one to stop (status `cancelling`). None if unknown."""

        def attempt() -> Run | None:
            with self.db.session(write=True) as session:
                # Each change is made only on the status it was chosen for; when a claim, a finish or a recovery
                # came between, the run is read again and what fits its new status is done.
                while (status := session.scalar(select(Run.status).where(Run.id == run_id))) not in (None, *TERMINAL):
                    if status == QUEUED:
                        change = {"status": CANCELLED, "finished_at": utcnow(),
                                  "error": RunError("cancelled", "cancelled before it started").to_dict()}
                    else:
                        change = {"status": CANCELLING}
                    if rowcount(session.execute(self._when(run_id, status).values(cancel_requested=True, **change))):
                        break
                return session.get(Run, run_id, options=_WITH_CALLBACK)

        return self.db.retry(attempt)

    def request_cancel(self, run_id: str) -> Run | None:
        """Ask an unfinished run to stop, whatever its status (`cancelling` until its backend reports the end)."""
        return self._change_unfinished(run_id, "prefect", cancel_requested=True, status=CANCELLING)

    def crash_runs_of_process(self, host: str, pid: int) -> builtins.list[str]:
        """End as crashed the active local runs a dead process held (its executor's and its inline ones: their
        owners name `host` and `pid`); returns their ids. For a process known dead, not one late with its lease."""
        owned = or_(Run.lease_owner.like(f"{host}:{pid}:%"), Run.lease_owner == f"execute-node:{host}:{pid}")

        def attempt() -> list[str]:
            with self.db.session(write=True) as session:
                now = self._now(session)
                held = session.scalars(select(Run.id).where(ACTIVE_LOCAL, owned)).all()
                return [run_id for run_id in held if self._end_attempt(
                    session, run_id, ACTIVE, CRASHED, None, RunError.process_died(pid), owned, Run.backend == "local",
                    now=now, log_error=True)]

        return self.db.retry(attempt)

    def recover_expired(self) -> builtins.list[str]:
        """Mark local runs whose lease lapsed (their process died) `crashed`; return their ids. An active local run
        without a lease (left by a lost update before transitions were compare-and-sets) is ended too: nothing
        renews it, and it would hold its connector's key for good."""

        def attempt() -> list[str]:
            with self.db.session(write=True) as session:
                now = self._now(session)
                lapsed = or_(Run.lease_expires_at < now, Run.lease_expires_at.is_(None))
                expired = session.execute(select(Run.id, Run.lease_owner, Run.lease_expires_at).where(
                    ACTIVE_LOCAL, lapsed)).all()  # uq_runs_one_active_per_key
                recovered = []
                for run_id, owner, lease_expires_at in expired:
                    error = RunError.lease_expired(owner) if lease_expires_at else RunError.no_lease(owner)
                    # Only if its lease is still lapsed: an owner that was late, not dead, may have finished it
                    # (or renewed) since the read, and its end stands.
                    if self._end_attempt(session, run_id, ACTIVE, CRASHED, None, error, Run.backend == "local",
                                         lapsed, now=now, log_error=True):
                        recovered.append(run_id)
                return recovered

        return self.db.retry(attempt)
