"""The run store's database as every floor opens it: SQLite tuned for several processes, or PostgreSQL.

The gateway's run store (app/runs) and the Prefect flows (the node cache) both open it from DATABASE_URL, so
this lives on the floor both import. Writes are short transactions, retried while SQLite still reports a lock.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

T = TypeVar("T")

# PostgreSQL: every call on the run paths is bounded, so a database that stops answering costs a run its lease
# (flows/lease.py fences it on time) and the gateway a bounded wait, not minutes of a hung thread. The server
# ends a statement or an open transaction that runs too long; the client's socket gives up on a connection that
# stopped acknowledging (tcp_user_timeout) or answering keepalives. Runs store short transactions only; a
# migration lifts the statement bound for itself (app/runs/schema.py).
PG_CONNECT_TIMEOUT_SECONDS = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
PG_IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
PG_SOCKET_ARGS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
                  "tcp_user_timeout": 15_000}


class Database:
    """An engine for reads and one for writes (on SQLite the writer takes the write lock up front)."""

    def __init__(self, url: str, busy_timeout_ms: int = 15_000):
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = self._make_engine(busy_timeout_ms)
        # Writes on SQLite take the write lock up front (BEGIN IMMEDIATE), so two processes never
        # deadlock upgrading read locks, and wait on busy_timeout instead of failing.
        self.writer = self.engine.execution_options(flowgate_write=True)

    def _make_engine(self, busy_timeout_ms: int) -> Engine:
        if not self.is_sqlite:
            options = " ".join(filter(None, [self.url.query.get("options"),  # the URL's own (a search_path) kept
                                             f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}",
                                             f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_TIMEOUT_MS}"]))
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
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    def create_tables(self, *metadatas: MetaData) -> None:
        """Create missing tables, and indexes added since a table was made (safe from every process)."""
        for metadata in metadatas:
            self.retry(lambda metadata=metadata: metadata.create_all(self.writer))
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    try:
                        self.retry(lambda index=index: index.create(self.writer, checkfirst=True))
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

    def retry(self, fn: Callable[[], T], attempts: int = 5) -> T:
        """Run `fn` (one transaction), again while SQLite reports a lock busy_timeout did not cover."""
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
