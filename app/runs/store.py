"""RunStore: runs in SQLite or PostgreSQL, with atomic claims and leases so any process can run any run."""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, selectinload

from app.runs.models import (
    ACTIVE, CANCELLED, CANCELLING, CRASHED, FAILED, QUEUED, RUNNING, TERMINAL, Base, Executor, NodeCacheEntry, Run,
    RunCallback, RunLog, RunNode, utcnow,
)

T = TypeVar("T")
# Plain SQL on purpose: this runs inside every trigger's write transaction, where each 0.1 ms holds SQLite's
# one write lock for every other writer (the ORM query took 5x as long). Covered by ix_runs_target_status.
_COUNT_QUEUED_SQLITE = f"SELECT count(*) FROM runs WHERE target = ? AND kind = ? AND status = '{QUEUED}'"
_COUNT_QUEUED_PG = f"SELECT count(*) FROM runs WHERE target = %(target)s AND kind = %(kind)s AND status = '{QUEUED}'"
_WITH_CALLBACK = (selectinload(Run.callback),)
_CLAIM_LOCK_ID = 0x666C6F77  # PostgreSQL advisory lock that serialises claims ("flow")


class QueueFull(Exception):
    """The target already has `limit` queued runs."""

    def __init__(self, kind: str, target: str, limit: int):
        super().__init__(f"{kind} '{target}' already has {limit} queued runs")
        self.limit = limit


class IdempotencyConflict(Exception):
    """An Idempotency-Key was used before with a different request."""

    def __init__(self, run: Run):
        super().__init__(f"idempotency key already used by run {run.id} with a different request")
        self.run = run


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

    @property
    def request_hash(self) -> str:
        """A fingerprint of the request, to tell a retry from a different call under the same key."""
        body = json.dumps([self.kind, self.target, self.params], sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Capacity:
    """The executors alive right now, across every process that shares the store."""

    executors: int
    slots: int
    busy: int


class RunStore:
    """Reads and writes runs; every state change is one short transaction."""

    def __init__(self, url: str, busy_timeout_ms: int = 15_000):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = self._make_engine(busy_timeout_ms)
        # Writes on SQLite take the write lock up front (BEGIN IMMEDIATE), so two processes never
        # deadlock upgrading read locks, and wait on busy_timeout instead of failing.
        self._writer = self.engine.execution_options(flowgate_write=True)

    def _make_engine(self, busy_timeout_ms: int) -> Engine:
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        database = self.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url, pool_size=10, max_overflow=20,
                               connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            write = connection.get_execution_options().get("flowgate_write")
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def create_schema(self) -> None:
        """Create the tables, and indexes added since a table was made, if missing (safe from every process)."""
        self._retry(lambda: Base.metadata.create_all(self._writer))
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                try:
                    self._retry(lambda index=index: index.create(self._writer, checkfirst=True))
                except (OperationalError, IntegrityError, ProgrammingError):
                    pass  # another process created it between the check and the create

    def dispose(self) -> None:
        """Close pooled connections (after a fork, or at exit)."""
        self.engine.dispose()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with Session(self._writer if write else self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def _retry(self, fn: Callable[[], T], attempts: int = 5) -> T:
        # busy_timeout covers nearly every wait; this covers what SQLite still reports as locked.
        for attempt in range(attempts):
            try:
                return fn()
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")

    def ping(self) -> float:
        """Round-trip one query; returns the latency in milliseconds (raises when the database is down)."""
        started = time.perf_counter()
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return (time.perf_counter() - started) * 1000

    # --- runs -------------------------------------------------------------------------------

    def create_run(self, new: NewRun) -> tuple[Run, bool]:
        """Insert a queued run; with an idempotency key already used, return that run instead (created=False)."""

        def attempt() -> tuple[Run, bool]:
            with self._session(write=True) as session:
                if new.idempotency_key:
                    existing = self._by_idempotency_key(session, new)
                    if existing is not None:
                        return existing, False
                if new.max_queued is not None and session.connection().exec_driver_sql(
                        _COUNT_QUEUED_SQLITE if self.is_sqlite else _COUNT_QUEUED_PG, (new.target, new.kind) if self.is_sqlite else {"target": new.target,
                                                                                     "kind": new.kind}
                ).scalar() >= new.max_queued:
                    raise QueueFull(new.kind, new.target, new.max_queued)  # in the write transaction: no race
                run = Run(id=uuid.uuid4().hex, kind=new.kind, target=new.target, params=new.params,
                          status=QUEUED, backend=new.backend, fallback_reason=new.fallback_reason,
                          idempotency_key=new.idempotency_key, request_hash=new.request_hash,
                          concurrency_key=new.concurrency_key, created_at=utcnow())
                session.add(run)
                if new.callback_url:  # in the same transaction: a run never exists without its callback
                    session.flush()  # the run's row first: the callback's foreign key points at it
                    run.callback = RunCallback(run_id=run.id, url=new.callback_url, status="pending", attempts=[],
                                               next_attempt_at=utcnow())
            return run, True

        try:
            run, created = self._retry(attempt)
        except IntegrityError:
            # Another process inserted the same key between our check and our insert.
            with self._session() as session:
                run, created = self._by_idempotency_key(session, new), False
        if not created and run.request_hash != new.request_hash:
            raise IdempotencyConflict(run)
        return run, created

    def start_inline(self, new: NewRun, owner: str, lease_seconds: float) -> Run | None:
        """Insert a run already `running` and held by `owner` (a connector node runs it in its own thread).

        None while another active run holds its concurrency key: the database refuses the second, as for claims.
        """

        def attempt() -> Run:
            with self._session(write=True) as session:
                if not self.is_sqlite:
                    session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CLAIM_LOCK_ID})
                now = utcnow()
                run = Run(id=uuid.uuid4().hex, kind=new.kind, target=new.target, params=new.params, status=RUNNING,
                          backend=new.backend, fallback_reason=new.fallback_reason, request_hash=new.request_hash,
                          concurrency_key=new.concurrency_key, created_at=now, started_at=now, attempts=1,
                          lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
                session.add(run)
            return run

        try:
            return self._retry(attempt)
        except IntegrityError:
            return None

    @staticmethod
    def _by_idempotency_key(session: Session, new: NewRun) -> Run | None:
        return session.scalars(select(Run).options(*_WITH_CALLBACK).where(
            Run.kind == new.kind, Run.target == new.target, Run.idempotency_key == new.idempotency_key)).first()

    def get(self, run_id: str) -> Run | None:
        """The run with this id, or None."""
        with self._session() as session:
            return session.get(Run, run_id, options=_WITH_CALLBACK)

    def list(self, target: str | None = None, status: str | None = None, limit: int = 50,
             before: tuple[datetime, str] | None = None) -> list[Run]:
        """Runs newest first; `before` is the (created_at, id) of the last run of the previous page."""
        query = select(Run).options(*_WITH_CALLBACK).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
        if target:
            query = query.where(Run.target == target)
        if status:
            query = query.where(Run.status == status)
        if before:
            created_at, run_id = before
            query = query.where((Run.created_at < created_at) | ((Run.created_at == created_at) & (Run.id < run_id)))
        with self._session() as session:
            return list(session.scalars(query))

    def last_ended_elsewhere(self, kind: str, target: str, host: str) -> bool:
        """Whether the latest ended run of `target` ran anywhere but a local executor on `host` (or none ended)."""
        with self._session() as session:
            last = session.execute(select(Run.backend, Run.lease_owner).where(
                Run.kind == kind, Run.target == target, Run.finished_at.is_not(None))
                .order_by(Run.finished_at.desc()).limit(1)).first()
        return last is None or last.backend != "local" or not (last.lease_owner or "").startswith(f"{host}:")

    def fail_overdue(self, backend: str, created_before: datetime, error: dict[str, Any]) -> list[Run]:
        """End as failed every unfinished run on `backend` created before `created_before`; returns them."""

        def attempt() -> list[Run]:
            now = utcnow()
            with self._session(write=True) as session:
                overdue = list(session.scalars(select(Run).where(
                    Run.backend == backend, Run.status.not_in(TERMINAL), Run.created_at < created_before)))
                for run in overdue:
                    run.status, run.finished_at, run.error, run.lease_expires_at = FAILED, now, error, None
                return overdue

        return self._retry(attempt)

    def count_by_status(self) -> dict[str, int]:
        """How many local runs are in each status."""
        with self._session() as session:
            rows = session.execute(select(Run.status, func.count()).where(Run.backend == "local").group_by(Run.status))
            return {status: count for status, count in rows}

    def claim_next(self, owner: str, lease_seconds: float, kinds: tuple[str, ...] | None = None) -> Run | None:
        """Atomically take the oldest queued local run (of `kinds`, default any) whose concurrency key is free;
        None when there is none."""

        def attempt() -> Run | None:
            with self._session(write=True) as session:
                if not self.is_sqlite:
                    session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _CLAIM_LOCK_ID})
                busy_keys = select(Run.concurrency_key).where(Run.status.in_(ACTIVE), Run.backend == "local")
                run = session.scalars(
                    select(Run)
                    .where(Run.status == QUEUED, Run.backend == "local", Run.concurrency_key.not_in(busy_keys),
                           *((Run.kind.in_(kinds),) if kinds is not None else ()))
                    .order_by(Run.created_at, Run.id)
                    .limit(1)
                ).first()
                if run is None:
                    return None
                now = utcnow()
                run.status, run.lease_owner = RUNNING, owner
                run.lease_expires_at = now + timedelta(seconds=lease_seconds)
                run.started_at, run.attempts = now, run.attempts + 1
            return run

        return self._retry(attempt)

    def renew_leases(self, owner: str, run_ids: list[str], lease_seconds: float) -> set[str]:
        """Extend the leases `owner` holds; return the ids among them whose cancellation was requested."""
        if not run_ids:
            return set()

        def attempt() -> set[str]:
            with self._session(write=True) as session:
                session.execute(update(Run).where(Run.id.in_(run_ids), Run.lease_owner == owner,
                                                  Run.status.in_(ACTIVE))
                                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
                return set(session.scalars(select(Run.id).where(Run.id.in_(run_ids), Run.cancel_requested)))

        return self._retry(attempt)

    def finish(self, run_id: str, owner: str, status: str, result: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None, logs: list[dict[str, Any]] | None = None) -> bool:
        """Record how a run ended (and its last log lines, in the same transaction); only while `owner` still
        holds it (a recovered run stays recovered)."""

        def attempt() -> bool:
            with self._session(write=True) as session:
                changed = session.execute(
                    update(Run).where(Run.id == run_id, Run.lease_owner == owner, Run.status.in_(ACTIVE))
                    .values(status=status, result=result, error=error, finished_at=utcnow(),
                            lease_expires_at=None)).rowcount
                if logs:
                    session.add_all(RunLog(**line) for line in logs)
            return changed == 1

        return self._retry(attempt)

    def update_unfinished(self, run_id: str, **values: Any) -> Run | None:
        """Change a run that has not ended yet (Prefect state, fallback); returns it, or None if it had ended."""

        def attempt() -> Run | None:
            with self._session(write=True) as session:
                run = session.get(Run, run_id, options=_WITH_CALLBACK)
                if run is None or run.is_terminal:
                    return None
                for name, value in values.items():
                    setattr(run, name, value)
            return run

        return self._retry(attempt)

    def unfinished(self, backend: str, limit: int = 100) -> list[Run]:
        """Runs on `backend` that have not ended, oldest first."""
        with self._session() as session:
            return list(session.scalars(select(Run).where(Run.backend == backend, Run.status.not_in(TERMINAL))
                                        .order_by(Run.created_at).limit(limit)))

    def cancel(self, run_id: str) -> Run | None:
        """Cancel a queued run at once; ask a running one to stop (status `cancelling`). None if unknown."""

        def attempt() -> Run | None:
            with self._session(write=True) as session:
                run = session.get(Run, run_id, options=_WITH_CALLBACK)
                if run is None or run.is_terminal:
                    return run
                run.cancel_requested = True
                if run.status == QUEUED:
                    run.status, run.finished_at = CANCELLED, utcnow()
                    run.error = {"code": "cancelled", "message": "cancelled before it started"}
                elif run.status == RUNNING:
                    run.status = CANCELLING
            return run

        return self._retry(attempt)

    def recover_expired(self) -> list[str]:
        """Mark local runs whose lease lapsed (their process died) `crashed`; return their ids."""

        def attempt() -> list[str]:
            now = utcnow()
            with self._session(write=True) as session:
                expired = list(session.scalars(select(Run).where(
                    Run.status.in_(ACTIVE), Run.backend == "local", Run.lease_expires_at < now)))
                for run in expired:
                    run.error = {"code": "lease_expired",
                                 "message": f"executor {run.lease_owner} stopped renewing its lease; "
                                            "the process running this run died"}
                    run.status, run.finished_at, run.lease_expires_at = CRASHED, now, None
                return [run.id for run in expired]

        return self._retry(attempt)

    # --- workflow nodes and the node cache -----------------------------------------------------

    def save_nodes(self, run_id: str, nodes: list[tuple[int, dict[str, Any]]]) -> None:
        """Record workflow nodes' latest states, each given as (position, node document with `id` and `status`)."""

        def attempt() -> None:
            with self._session(write=True) as session:
                for position, data in nodes:
                    row = session.get(RunNode, (run_id, data["id"]))
                    if row is None:
                        session.add(RunNode(run_id=run_id, node_id=data["id"], position=position,
                                            status=data["status"], data=data, updated_at=utcnow()))
                    else:
                        row.status, row.data, row.updated_at = data["status"], data, utcnow()

        try:
            self._retry(attempt)
        except IntegrityError:  # another process inserted one first (a Prefect sync racing a GET): update it
            self._retry(attempt)

    def nodes(self, run_id: str) -> list[dict[str, Any]]:
        """A workflow run's nodes in declaration order."""
        with self._session() as session:
            return [row.data for row in session.scalars(
                select(RunNode).where(RunNode.run_id == run_id).order_by(RunNode.position))]

    def cache_get(self, key: str) -> tuple[bool, Any]:
        """(True, output) for a live entry, (False, None) otherwise."""
        with self._session() as session:
            entry = session.get(NodeCacheEntry, key)
            if entry is None or entry.expires_at <= utcnow():
                return False, None
            return True, entry.output

    def cache_put(self, key: str, node_type: str, output: Any, ttl_seconds: float) -> None:
        """Store an output for `ttl_seconds`; expired entries are swept on the way."""

        def attempt() -> None:
            now = utcnow()
            with self._session(write=True) as session:
                session.execute(delete(NodeCacheEntry).where(NodeCacheEntry.expires_at <= now))
                entry = session.get(NodeCacheEntry, key)
                if entry is None:
                    session.add(NodeCacheEntry(key=key, node_type=node_type, output=output, created_at=now,
                                               expires_at=now + timedelta(seconds=ttl_seconds)))
                else:
                    entry.output, entry.created_at = output, now
                    entry.expires_at = now + timedelta(seconds=ttl_seconds)

        try:
            self._retry(attempt)
        except IntegrityError:  # two processes cached the same key at once: either value will do
            pass

    # --- run logs -----------------------------------------------------------------------------

    def add_logs(self, lines: list[dict[str, Any]]) -> None:
        """Append log lines (dicts with run_id, at, level, logger, message)."""
        if lines:
            self._retry(lambda: self._insert_logs(lines))

    def _insert_logs(self, lines: list[dict[str, Any]]) -> None:
        with self._session(write=True) as session:
            session.add_all(RunLog(**line) for line in lines)

    def logs(self, run_id: str, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """A run's lines in order, those with an id above `after` (a cursor), at most `limit`."""
        with self._session() as session:
            rows = session.scalars(select(RunLog).where(RunLog.run_id == run_id, RunLog.id > after)
                                   .order_by(RunLog.id).limit(limit))
            return [{"id": row.id, "at": row.at, "level": row.level, "logger": row.logger, "message": row.message}
                    for row in rows]

    # --- callbacks ----------------------------------------------------------------------------

    def claim_callback(self, owner: str, lease_seconds: float) -> tuple[RunCallback, Run] | None:
        """Take the next due delivery of an ended run (held for `lease_seconds`); None when none is due."""

        def attempt() -> tuple[RunCallback, Run] | None:
            now = utcnow()
            with self._session(write=True) as session:
                found = session.execute(
                    select(RunCallback, Run).join(Run, Run.id == RunCallback.run_id)
                    .where(RunCallback.status == "pending", Run.status.in_(TERMINAL),
                           RunCallback.next_attempt_at <= now,
                           (RunCallback.claimed_until.is_(None)) | (RunCallback.claimed_until < now))
                    .order_by(RunCallback.next_attempt_at).limit(1)
                    .with_for_update(skip_locked=True, of=RunCallback)).first()
                if found is None:
                    return None
                callback, run = found
                callback.claimed_by, callback.claimed_until = owner, now + timedelta(seconds=lease_seconds)
                return callback, run

        return self._retry(attempt)

    def record_delivery(self, run_id: str, owner: str, attempt: dict[str, Any], delivered: bool,
                        retry_at: datetime | None) -> None:
        """Add one delivery attempt; `retry_at` None without delivery means the callback gave up."""

        def write() -> None:
            with self._session(write=True) as session:
                callback = session.get(RunCallback, run_id)
                if callback is None or callback.claimed_by != owner:
                    return
                callback.attempts = [*(callback.attempts or []), attempt]
                callback.claimed_by, callback.claimed_until = None, None
                if delivered:
                    callback.status = "delivered"
                elif retry_at is None:
                    callback.status = "failed"
                else:
                    callback.next_attempt_at = retry_at

        self._retry(write)

    # --- executors --------------------------------------------------------------------------

    def heartbeat(self, executor_id: str, hostname: str, pid: int, slots: int, busy: int) -> None:
        """Record that an executor is alive, with its slots and how many are busy."""

        def attempt() -> None:
            with self._session(write=True) as session:
                row = session.get(Executor, executor_id)
                if row is None:
                    session.add(Executor(id=executor_id, hostname=hostname, pid=pid, slots=slots, busy=busy,
                                         started_at=utcnow(), heartbeat_at=utcnow()))
                else:
                    row.busy, row.slots, row.heartbeat_at = busy, slots, utcnow()

        self._retry(attempt)

    def remove_executor(self, executor_id: str) -> None:
        """Forget an executor that stopped."""
        self._retry(lambda: self._delete_executors(Executor.id == executor_id))

    def capacity(self, stale_after_seconds: float) -> Capacity:
        """Executors with a heartbeat newer than `stale_after_seconds`, and their slots."""
        since = utcnow() - timedelta(seconds=stale_after_seconds)
        with self._session() as session:
            executors, slots, busy = session.execute(
                select(func.count(), func.coalesce(func.sum(Executor.slots), 0),
                       func.coalesce(func.sum(Executor.busy), 0)).where(Executor.heartbeat_at >= since)).one()
        return Capacity(executors=executors, slots=slots, busy=busy)

    def forget_stale_executors(self, stale_after_seconds: float) -> None:
        """Drop executors that stopped heartbeating long ago."""
        since = utcnow() - timedelta(seconds=stale_after_seconds)
        self._retry(lambda: self._delete_executors(Executor.heartbeat_at < since))

    def _delete_executors(self, condition: Any) -> None:
        with self._session(write=True) as session:
            session.execute(delete(Executor).where(condition))
