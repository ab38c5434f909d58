"""The run store's database as every floor opens it: SQLite tuned for several processes, or PostgreSQL.

The gateway's run store (app/runs) and the Prefect flows (the node cache) both open it from DATABASE_URL, so
this lives on the floor both import. Writes are short transactions, retried while SQLite still reports a lock
(and, for a transaction that may run twice, after any transient error: `is_transient`).
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, MetaData, Result, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

T = TypeVar("T")
log = logging.getLogger(__name__)

# PostgreSQL's SQLSTATE classes after which the same transaction may succeed when tried again: the connection
# failed (08), the transaction was rolled back for a serialization failure or a deadlock (40), the server ran
# short of resources (53), or an operator or a restart ended the session or cancelled the statement (57).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")


def is_transient(exc: DBAPIError) -> bool:
    """Whether trying the same transaction again may succeed: the connection was lost or reset (a failover, a
    restart, a network blip), a serialization failure or deadlock, SQLite's lock. Never a constraint violation,
    bad data or SQL, or a refused login: those fail the same way every time."""
    if isinstance(exc, (IntegrityError, ProgrammingError, DataError)):
        return False
    if exc.connection_invalidated:  # SQLAlchemy saw a disconnect: a new connection may work
        return True
    if type(exc.orig).__module__ == "sqlite3":  # a local file: only its lock passes (not "no such table", I/O)
        return "locked" in str(exc).lower()
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if state:
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES
    return isinstance(exc, (OperationalError, InterfaceError))  # no SQLSTATE: the driver lost the server


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE run through a Session changed. Session.execute is typed to return a Result; for
    those statements it returns a CursorResult, which has the count (SQLAlchemy's typing leaves the cast to us)."""
    return cast(CursorResult[Any], result).rowcount


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

# PostgreSQL: every call on the run paths is bounded, so a database that stops answering costs a run its lease
# (flows/lease.py fences it on time) and the gateway a bounded wait, not minutes of a hung thread. The server
# ends a statement or an open transaction that runs too long; the client's socket gives up on a connection that
# stopped acknowledging (tcp_user_timeout) or answering keepalives. Runs store short transactions only; a
# migration lifts the statement bound for itself (app/runs/migrate.py).
PG_CONNECT_TIMEOUT_SECONDS = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
PG_IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
PG_SOCKET_ARGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                  "tcp_user_timeout": 15_000}


class Database:
    """An engine for reads and one for writes (on SQLite the writer takes the write lock up front).

    On SQLite the threads of one process also take turns writing (`_write_turn`) before they ask SQLite for its
    lock: a thread that finds SQLite's lock taken sleeps in SQLite's busy handler in steps of 1, 2, 5 ... up to
    100 ms, whoever released the lock meanwhile, so under a flood of triggers a write waited hundreds of ms behind a
    lock that was free most of the time; a thread waiting for its turn wakes as soon as the last one's ends. Only
    other processes' writers are left to the busy handler."""

    def __init__(self, url: str, busy_timeout_ms: int = 15_000):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._write_turn = threading.Lock()
        self.engine = self._make_engine(busy_timeout_ms)
        # Writes on SQLite take the write lock up front (BEGIN IMMEDIATE), so two processes never
        # deadlock upgrading read locks, and wait on busy_timeout instead of failing.
        self.writer = self.engine.execution_options(flowgate_write=True)

    def _make_engine(self, busy_timeout_ms: int) -> Engine:
        if not self.is_sqlite:
            idle = PG_IDLE_IN_TRANSACTION_TIMEOUT_MS
            own = self.url.query.get("options")  # the URL's own (a search_path) kept; a tuple when repeated
            options = " ".join(filter(None, [*((own,) if isinstance(own, str) else own or ()),
                                             f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
                                             f"-c idle_in_transaction_session_timeout={idle}"]))
            return create_engine(self.url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10,
                                 connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS, "options": options,
                                               **PG_SOCKET_ARGS})
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
            if write:
                self._take_write_turn(connection.connection.record_info, busy_timeout_ms / 1000)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        @event.listens_for(engine, "checkin")
        def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
            # Held from the first write transaction's BEGIN until the connection goes back to the pool (however it
            # ended: commit, rollback, invalidated), so a connection's later transactions need no second turn.
            if record.record_info.pop("flowgate_write_turn", False):
                self._write_turn.release()

        return engine

    def _take_write_turn(self, record_info: dict[str, Any], timeout: float) -> None:
        """This thread's turn to write, for the pooled connection `record_info` belongs to; "database is locked"
        (which `retry` tries again) when it does not come within SQLite's own busy timeout."""
        if record_info.get("flowgate_write_turn"):
            return
        if not self._write_turn.acquire(timeout=timeout):
            raise OperationalError("BEGIN IMMEDIATE", None,
                                   sqlite3.OperationalError("database is locked (no write turn in this process)"))
        record_info["flowgate_write_turn"] = True

    def create_tables(self, *metadatas: MetaData) -> None:
        """Create missing tables, and indexes added since a table was made (safe from every process)."""
        for metadata in metadatas:
            self.retry(partial(metadata.create_all, self.writer))
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    try:
                        self.retry(partial(index.create, self.writer, checkfirst=True))
                    except (OperationalError, IntegrityError, ProgrammingError):
                        pass  # another process created it between the check and the create

    def dispose(self) -> None:
        """Close pooled connections (after a fork, or at exit)."""
        self.engine.dispose()

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One transaction; `write` takes SQLite's write lock at its start."""
        with Session(self.writer if write else self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def retry(self, fn: Callable[[], T], attempts: int = 5, transient: bool = False, first_wait: float = 0.05) -> T:
        """Run `fn` (one transaction), again while SQLite reports a lock busy_timeout did not cover; with
        `transient`, also after any error another try may not meet (`is_transient`: a dropped connection, a
        failover, a serialization failure). Only for a transaction that may run twice: its first try may have
        committed before the connection dropped. Waits double from `first_wait` between tries."""
        for attempt in range(attempts):
            try:
                return fn()
            except DBAPIError as exc:
                locked = isinstance(exc, OperationalError) and "locked" in str(exc).lower()
                if not (locked or transient and is_transient(exc)) or attempt == attempts - 1:
                    raise
                wait = first_wait * 2 ** attempt
                if not locked:
                    log.warning("a database call failed (%s); trying again in %.2f s", _first_line(exc), wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def ping(self) -> float:
        """Round-trip one query; returns the latency in milliseconds (raises when the database is down)."""
        started = time.perf_counter()
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return (time.perf_counter() - started) * 1000
