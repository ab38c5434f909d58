"""The PostgreSQL the `postgres` tier uses (FLOWGATE_TEST_POSTGRES_URL), and whether it answers."""
from __future__ import annotations

import os

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
