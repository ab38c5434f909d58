"""Run log lines in the store: what a local run's threads logged, readable from every process."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.runs.models import RunLog
from flows.database import Database

_INSERT = RunLog.__table__.insert()


class RunLogStore:
    """Appends and pages through runs' log lines (ids are the cursor)."""

    def __init__(self, database: Database):
        self.database = database

    def add(self, lines: list[dict[str, Any]]) -> None:
        """Append log lines (dicts with run_id, at, level, logger, message)."""
        if lines:
            self.database.retry(lambda: self._insert(lines))

    def _insert(self, lines: list[dict[str, Any]]) -> None:
        # One Core executemany, no ORM objects: every trigger logs its acceptance on its run, so a batch holds a line
        # per trigger, written under SQLite's one write lock (the ORM's unit of work was 4.5% of a worker's CPU
        # under a flood of triggers, py-spy, 2026-12-03).
        with self.database.writer.begin() as connection:
            connection.execute(_INSERT, lines)

    def read(self, run_id: str, after: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        """A run's lines in order, those with an id above `after` (a cursor), at most `limit`."""
        with self.database.session() as session:
            rows = session.scalars(select(RunLog).where(RunLog.run_id == run_id, RunLog.id > after)
                                   .order_by(RunLog.id).limit(limit))
            return [{"id": row.id, "at": row.at, "level": row.level, "logger": row.logger, "message": row.message}
                    for row in rows]
