"""flows/database.py: which database errors a retry may get past (transient) and which it never will."""
from __future__ import annotations

import sqlite3

import psycopg
import pytest
from psycopg import errors as pg
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError

from flows.database import is_transient


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
