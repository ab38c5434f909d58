"""An events table in a SQLite file that a test adds rows to, and an incremental connector over it (cursor
updated_at), for the tests of incremental loads: locally, on Prefect, killed mid-way, reported."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from connectors.registry import ConnectorRegistry


def events_db(path: Path, rows: list[tuple[int, str, str]]) -> None:
    """Insert or replace (id, status, updated_at) rows in the events table of the SQLite file at `path`."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, status TEXT, updated_at TEXT)")
        con.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?)", rows)


def incremental_registry(workdir: Path, disposition: str) -> ConnectorRegistry:
    """A registry whose connector `inc` loads workdir/events.db's events incrementally, with `disposition`."""
    path = workdir / f"inc-{disposition}.yaml"
    path.write_text("connectors:\n  inc:\n    source:\n      kind: sql_database\n      url: 'sqlite:///events.db'\n"
                    "      tables: [events]\n      incremental: {cursor: updated_at}\n"
                    f"    write_disposition: {disposition}\n    allow_full_refresh: true\n")
    return ConnectorRegistry.load(path)
