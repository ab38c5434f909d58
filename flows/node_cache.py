"""The workflow engine's node cache in the run store's database: one cache for every process that runs nodes
(gateway workers and Prefect flow runs alike)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from flows.database import Database, rowcount

metadata = MetaData()

node_cache = Table(
    "node_cache", metadata,
    Column("key", String(64), primary_key=True),  # cache_key(): node type + resolved config + input
    Column("node_type", String(50), nullable=False),
    Column("output", JSON),
    Column("created_at", DateTime, nullable=False),  # UTC, without zone (as the run store keeps times)
    Column("expires_at", DateTime, nullable=False, index=True),
)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class SqlNodeCache:
    """The engine's NodeCache on the `node_cache` table; expired entries are swept as new ones are written."""

    def __init__(self, database: Database):
        self.database = database

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, output) for a live entry, (False, None) otherwise."""
        with self.database.session() as session:
            row = session.execute(select(node_cache.c.output, node_cache.c.expires_at)
                                  .where(node_cache.c.key == key)).first()
        if row is None or row.expires_at <= _now():
            return False, None
        return True, row.output

    def put(self, key: str, node_type: str, output: Any, ttl_seconds: float) -> None:
        """Store an output for `ttl_seconds`."""

        def attempt() -> None:
            now = _now()
            values = {"node_type": node_type, "output": output, "created_at": now,
                      "expires_at": now + timedelta(seconds=ttl_seconds)}
            with self.database.session(write=True) as session:
                session.execute(delete(node_cache).where(node_cache.c.expires_at <= now))
                if not rowcount(session.execute(update(node_cache).where(node_cache.c.key == key).values(**values))):
                    session.execute(insert(node_cache).values(key=key, **values))

        try:
            self.database.retry(attempt)
        except IntegrityError:  # two processes cached the same key at once: either value will do
            pass
