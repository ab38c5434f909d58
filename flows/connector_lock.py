"""One connector (one DuckDB file, one dlt pipeline) runs once at a time, whoever runs it: the gateway's local
executors and Prefect flow runs on any host take the same key in the run store's database.

Local runs hold their key as an active row in the `runs` table (a partial unique index makes the database
refuse a second). A Prefect flow run, which has no such row to hold, holds a `connector_locks` row instead, with
a lease it renews while it runs. Both sides check the other's under one lock (PostgreSQL: an advisory lock;
SQLite: its write lock), so neither starts beside the other.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, delete, insert, select, text, update
from sqlalchemy.orm import Session

from flows.database import Database, rowcount
from flows.lease import keep_one
from flows.outcome import TERMINAL

log = logging.getLogger(__name__)

metadata = MetaData()

connector_locks = Table(
    "connector_locks", metadata,
    Column("key", String(512), primary_key=True),  # the run's concurrency key (connectors.pipeline.concurrency_key)
    Column("holder", String(200), nullable=False),  # e.g. prefect:<flow run id>
    Column("expires_at", DateTime, nullable=False),  # UTC without zone, as the run store keeps times
)

CLAIM_LOCK_ID = 0x666C6F77  # PostgreSQL advisory lock serialising every claim of a key ("flow")
# An active local run holds its key; written out here so this floor needs nothing of the gateway's models.
_LOCAL_RUN_HOLDS = text("SELECT 1 FROM runs WHERE concurrency_key = :key AND status IN ('running', 'cancelling') "
                        "AND backend = 'local' LIMIT 1")


_RUN_STATE = text("SELECT backend, status FROM runs WHERE id = :id")
_RUN_PARAMS = text("SELECT kind, params FROM runs WHERE id = :id")
# How a flow's refusal for want of its run begins: a gateway that holds the run knows from it that its workers'
# run store is not its own (app/backends/prefect.py).
NOT_IN_RUN_STORE = "the run store at this worker's DATABASE_URL"


def run_moved_off_prefect(database: Database, run_id: str) -> str | None:
    """Why a Prefect flow run of run `run_id` must not execute (None: it may). The gateway took the run back (it
    runs locally: a create it could not confirm in time, whose flow run a worker picks up later) or ended it (its
    timeout), so the flow asks the run store itself.

    Fails closed: a run store without the run cannot say the run is still this flow run's. No runs table means
    this worker's DATABASE_URL is not the gateways' (its connector locks would hold against nobody); no row
    means the same, or that the run was pruned (a flow run left waiting past FLOWGATE_RETENTION_DAYS)."""
    with database.session() as session:
        if not ConnectorLock._runs_table(session):
            row, missing = None, "has no runs table: it is not the gateways' run store"
        else:
            row = session.execute(_RUN_STATE, {"id": run_id}).first()
            missing = f"has no run {run_id}: it is not the gateways' run store, or the run was pruned"
    if row is None:
        log.error("not executing the flow run of run %s: the run store at DATABASE_URL (%s) %s; a worker needs the "
                  "gateways' DATABASE_URL", run_id, database.url.render_as_string(hide_password=True), missing)
        return f"{NOT_IN_RUN_STORE} {missing}"
    if row.backend == "prefect" and row.status not in TERMINAL:
        return None
    return f"run {run_id} is no longer this flow run's: it is {row.status} on the {row.backend} backend"


def stored_params(database: Database, run_id: str, kind: str) -> dict[str, Any] | None:
    """The params the gateway validated and stored for run `run_id` of `kind`; None when the run store holds no
    such run."""
    with database.session() as session:
        if not ConnectorLock._runs_table(session):
            return None
        row = session.execute(_RUN_PARAMS, {"id": run_id}).first()
    if row is None or row.kind != kind:
        return None
    return json.loads(row.params) if isinstance(row.params, str) else row.params  # SQLite: the JSON text


def warn_unless_shared(database: Database) -> None:
    """For a flow run no gateway created (a Prefect schedule): log an ERROR when this worker's run store is not
    the gateways' (no runs table), where its connector lock keeps out other flow runs but no local run."""
    with database.session() as session:
        if ConnectorLock._runs_table(session):
            return
    log.error("the run store at DATABASE_URL (%s) has no runs table: this worker does not share the gateways' run "
              "store, so a local run of the same connector may run beside this flow run; set DATABASE_URL to "
              "theirs", database.url.render_as_string(hide_password=True))


class LockLost(RuntimeError):
    """The lease on a connector's key lapsed (this process could not renew it) and another run may have it."""


def now_utc(session: Session, is_sqlite: bool) -> datetime:
    """The database's clock, as a naive UTC time (this host's for SQLite, a local file)."""
    if is_sqlite:
        return datetime.now(timezone.utc).replace(tzinfo=None)
    return session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()


def serialise_claims(session: Session, is_sqlite: bool) -> None:
    """Take the lock every claim of a key holds for its transaction (SQLite's write transaction already is one)."""
    if not is_sqlite:
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": CLAIM_LOCK_ID})


def held_by_others(session: Session, is_sqlite: bool) -> Any:
    """The keys a live connector_locks row holds: local claims skip runs with these keys."""
    return select(connector_locks.c.key).where(connector_locks.c.expires_at > now_utc(session, is_sqlite))


class ConnectorLock:
    """Holds a connector's key for a run that is not a local run (a Prefect flow run, a node inside one)."""

    def __init__(self, database: Database, lease_seconds: float = 30.0, poll_seconds: float = 1.0):
        self.database = database
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds

    def try_acquire(self, key: str, holder: str) -> bool:
        """Take `key` for `holder` unless a live lock or an active local run has it.

        Behind an active local run, `holder` still reserves the key (the same row, renewed by each attempt): no
        new local run of it starts, so the flow run is next when that run ends, however steadily local runs of
        the connector are queued. A holder that stops trying stops renewing, and its reservation lapses."""

        def attempt() -> bool:
            with self.database.session(write=True) as session:
                serialise_claims(session, self.database.is_sqlite)
                now = now_utc(session, self.database.is_sqlite)
                # Row-locked: a renewal (which takes no claim lock) must not land between this read and write.
                row = session.execute(select(connector_locks).where(connector_locks.c.key == key)
                                      .with_for_update()).first()
                if row is not None and row.expires_at > now and row.holder != holder:
                    return False
                expires = now + timedelta(seconds=self.lease_seconds)
                if row is None:
                    session.execute(insert(connector_locks).values(key=key, holder=holder, expires_at=expires))
                else:
                    session.execute(update(connector_locks).where(connector_locks.c.key == key)
                                    .values(holder=holder, expires_at=expires))
                return not (self._runs_table(session) and session.execute(_LOCAL_RUN_HOLDS, {"key": key}).first())

        return self.database.retry(attempt)

    def renew(self, key: str, holder: str) -> bool:
        """Extend the lease; False when `holder` no longer has the key, or its lease lapsed (a local run may have
        been claimed since: a lapsed lock is nobody's, whoever it still names)."""

        def attempt() -> bool:
            with self.database.session(write=True) as session:
                now = now_utc(session, self.database.is_sqlite)
                return rowcount(session.execute(update(connector_locks).where(
                    connector_locks.c.key == key, connector_locks.c.holder == holder,
                    connector_locks.c.expires_at > now)
                    .values(expires_at=now + timedelta(seconds=self.lease_seconds)))) == 1

        return self.database.retry(attempt)

    def release(self, key: str, holder: str) -> None:
        """Give the key back."""

        def attempt() -> None:
            with self.database.session(write=True) as session:
                session.execute(delete(connector_locks).where(connector_locks.c.key == key,
                                                              connector_locks.c.holder == holder))

        self.database.retry(attempt)

    @contextmanager
    def hold(self, key: str, holder: str, should_stop: Callable[[], bool] = lambda: False,
             lost: threading.Event | None = None) -> Iterator[threading.Event]:
        """Wait for `key`, hold it while the block runs (kept by a LeaseKeeper), release it after.

        Yields an event (`lost`, when given: a flow run's, which its lease on its run sets too) that is set if the
        lease is lost (taken, or not renewed in time): stop (LockLost)."""
        waited = False
        asked = time.monotonic()  # the lease runs from no earlier than this
        while not self.try_acquire(key, holder):
            if should_stop():
                self.release(key, holder)  # the reservation made while waiting
                raise LockLost(f"stopped while waiting for {key}")
            if not waited:
                log.info("waiting for another run of %s to end", key)
                waited = True
            time.sleep(self.poll_seconds)
            asked = time.monotonic()
        lost = lost or threading.Event()
        lease = keep_one(key, lambda: self.renew(key, holder), self.lease_seconds, lost, since=asked)
        try:
            yield lost
        finally:
            lease.close()
            try:
                self.release(key, holder)
            except Exception:  # the lease lapses by itself
                log.exception("releasing %s failed; it frees itself when its lease lapses", key)

    @staticmethod
    def _runs_table(session: Session) -> bool:
        # A Prefect flow may use a database no gateway has created its tables in yet.
        return session.connection().dialect.has_table(session.connection(), "runs")
