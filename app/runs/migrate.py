"""The run store's schema under Alembic: migrations applied under a lock, so any number of processes may start
at once, and a database made by the old create_all adopted as the baseline."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, MetaData, inspect, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from flows.database import Database

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
HEAD = "0009"  # the newest revision under migrations/versions (a test checks they agree)
_MIGRATION_LOCK_ID = 0x666C6F78  # PostgreSQL advisory lock held while one process migrates ("flox")
# The databases this process brought to HEAD, or its parent did before forking it: gunicorn's master migrates
# before it forks a worker (gunicorn.conf.py), so a worker boots without asking the database anything. A worker
# that had to ask would fail to boot while the database hangs, and a worker failing to boot stops the master.
_at_head: set[str] = set()


def target_metadata() -> list[MetaData]:
    """The tables the migrations must end up with: the run store's, the engine's node cache and the connector
    locks Prefect flow runs hold."""
    from app.runs.models import Base
    from flows.connector_lock import metadata as connector_lock_metadata
    from flows.node_cache import metadata as node_cache_metadata

    return [Base.metadata, node_cache_metadata, connector_lock_metadata]


def current_revision(database: Database) -> str | None:
    """The revision the database is at; None for an empty database or one made by create_all before migrations."""
    try:
        with database.engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except (OperationalError, ProgrammingError):  # created meanwhile, or half-made: the locked path decides
        return None


@contextmanager
def locked(database: Database) -> Iterator[Connection]:
    """A connection in a transaction that only one process at a time holds: PostgreSQL's advisory lock, SQLite's
    write lock (BEGIN IMMEDIATE). Everything done on it commits at the end, or nothing does."""
    with database.writer.connect() as connection:
        with connection.begin():
            if not database.is_sqlite:
                # A migration may rewrite a big table, and a replica waits here for another's: no statement bound.
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            yield connection


def alembic_config(connection: Connection | None = None) -> Any:
    """Alembic's configuration for the run store's migrations (on `connection` when given)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(database: Database, revision: str = "head") -> None:
    """Bring the schema to `revision`: nothing to do costs one query; otherwise migrate under the lock, where a
    second process waits, then finds the work done."""
    to_head = revision in ("head", HEAD)
    key = database.url.render_as_string(hide_password=False)
    if to_head and (key in _at_head or current_revision(database) == HEAD):
        _at_head.add(key)
        return
    from alembic import command

    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at INFO is noise
    with locked(database) as connection:
        command.upgrade(alembic_config(connection), revision)
    if to_head:
        _at_head.add(key)


def downgrade(database: Database, revision: str) -> None:
    """Take the schema back to `revision` (under the same lock)."""
    from alembic import command

    _at_head.discard(database.url.render_as_string(hide_password=False))
    with locked(database) as connection:
        command.downgrade(alembic_config(connection), revision)
