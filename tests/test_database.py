"""flows/database.py: which database errors a retry may get past (transient) and which it never will; on SQLite,
the threads of one process take turns writing."""
from __future__ import annotations

import sqlite3
import threading

import psycopg
import pytest
from psycopg import errors as pg
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError

from flows.database import Database, is_transient


@pytest.mark.parametrize("error, transient", [
    (OperationalError("UPDATE", {}, pg.SerializationFailure("could not serialize access")), True),
    (OperationalError("UPDATE", {}, pg.DeadlockDetected("deadlock detected")), True),
    (OperationalError("UPDATE", {}, pg.AdminShutdown("terminating connection due to administrator command")), True),
    (OperationalError("UPDATE", {}, pg.CannotConnectNow("the database system is starting up")), True),
    (OperationalError("UPDATE", {}, psycopg.OperationalError("server closed the connection unexpectedly")), True),
    (InterfaceError("UPDATE", {}, psycopg.InterfaceError("the connection is closed")), True),
    (OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked")), True),
    (OperationalError("UPDATE", {}, pg.InvalidPassword("password authentication failed")), False),
    (OperationalError("UPDATE", {}, sqlite3.OperationalError("no such table: runs")), False),
    (IntegrityError("INSERT", {}, pg.NotNullViolation("null value in column \"message\"")), False),
    (ProgrammingError("UPDATE", {}, pg.UndefinedTable("relation \"runs\" does not exist")), False),
], ids=lambda value: f"{type(value.orig).__module__}.{type(value.orig).__name__}" if isinstance(value, Exception)
    else str(value))
def test_only_errors_another_try_may_get_past_are_transient(error, transient):
    assert is_transient(error) is transient


def test_a_postgresql_url_keeps_every_options_parameter_it_repeats(postgres_url):
    """libpq takes `options` once; a URL may give it twice (a search_path, a work_mem): both reach the server,
    beside flowgate's own timeouts."""
    database = Database(f"{postgres_url}&options=-cwork_mem%3D7MB")
    try:
        with database.session() as session:
            search_path = session.execute(text("SHOW search_path")).scalar()
            work_mem = session.execute(text("SHOW work_mem")).scalar()
            statement_timeout = session.execute(text("SHOW statement_timeout")).scalar()
    finally:
        database.dispose()
    assert search_path == postgres_url.rsplit("%3D", 1)[1]
    assert work_mem == "7MB"
    assert statement_timeout == "30s"


@pytest.fixture
def sqlite_db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'turns.db'}", busy_timeout_ms=200)
    with database.writer.begin() as connection:
        connection.execute(text("CREATE TABLE t (i INTEGER)"))
    yield database
    database.dispose()


def test_a_write_keeps_its_process_turn_until_its_connection_goes_back_to_the_pool(sqlite_db):
    """The turn is what other threads of the process wait on (woken at once), instead of SQLite's busy handler."""
    assert not sqlite_db._write_turn.locked()
    with sqlite_db.writer.connect() as connection:
        with connection.begin():
            connection.execute(text("INSERT INTO t VALUES (1)"))
            assert sqlite_db._write_turn.locked()
        connection.execute(text("INSERT INTO t VALUES (2)"))  # a second transaction on the connection: no second turn
        connection.commit()
        assert sqlite_db._write_turn.locked()
    assert not sqlite_db._write_turn.locked()
    with sqlite_db.engine.connect() as connection:  # reads take no turn
        assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 2
        assert not sqlite_db._write_turn.locked()


def test_a_write_connection_that_fails_gives_its_turn_back(sqlite_db):
    with pytest.raises(OperationalError):
        with sqlite_db.writer.begin() as connection:
            connection.execute(text("INSERT INTO missing VALUES (1)"))
    assert not sqlite_db._write_turn.locked()
    with sqlite_db.writer.connect() as connection:
        connection.begin()
        connection.invalidate()
    assert not sqlite_db._write_turn.locked()
    with sqlite_db.writer.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))


def test_a_write_whose_turn_does_not_come_is_database_is_locked_and_retry_tries_it_again(sqlite_db):
    """As SQLite's own lock did: a thread waits at most the busy timeout, then `retry` tries again."""
    refused = threading.Event()
    attempts = []

    def hold() -> None:
        with sqlite_db.writer.begin() as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))
            refused.wait(30)

    def write() -> None:
        attempts.append(1)
        try:
            with sqlite_db.writer.begin() as connection:
                connection.execute(text("INSERT INTO t VALUES (2)"))
        except OperationalError as exc:
            assert "database is locked" in str(exc) and is_transient(exc)
            refused.set()
            raise

    holder = threading.Thread(target=hold)
    holder.start()
    while not sqlite_db._write_turn.locked():
        threading.Event().wait(0.01)
    sqlite_db.retry(write, attempts=10)
    holder.join()
    assert len(attempts) >= 2
    with sqlite_db.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 2
