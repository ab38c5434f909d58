"""The PostgreSQL the `postgres` tier uses (FLOWGATE_TEST_POSTGRES_URL), and whether it answers."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

POSTGRES_URL = os.environ.get("FLOWGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def postgres_available() -> str | None:
    """None when PostgreSQL answers at FLOWGATE_TEST_POSTGRES_URL, else why not."""
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure to connect means: skip (or fail where CI requires it)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards; skips the test without a server
    (fails it with FLOWGATE_REQUIRE_POSTGRES). tests/conftest.py gives a test the `postgres` tier when it reaches
    this, as its postgres_url fixture does."""
    reason = postgres_available()
    if reason:
        if os.environ.get("FLOWGATE_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here but unreachable: {reason}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {reason}")
    with fresh_schema() as url:
        yield url


@contextmanager
def fresh_schema(prefix: str = "flowgate_test") -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a new schema, dropped afterwards (the server must answer: a benchmark
    asks postgres_available() first)."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
