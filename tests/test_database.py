"""flows/database.py: which database errors a retry may get past (transient) and which it never will."""
from __future__ import annotations

import sqlite3

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
