"""Retention in the store: ended runs older than a cutoff deleted with their log lines, node states, callback and
idempotency key, in small batches, by one process at a time."""
from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select, text

from app.runs.models import Run, RunCallback, RunJoin, RunLabel, RunLog, RunNode
from flows.database import Database
from flows.outcome import TERMINAL

_PRUNE_LOCK_ID = 0x666C6F79  # PostgreSQL advisory lock held by the process pruning ("floy")


class RetentionStore:
    """Deletes what has ended and aged out; never a run that is queued or running, however old."""

    def __init__(self, database: Database):
        self.database = database

    def prune(self, cutoff: datetime, batch_size: int = 500, pause_seconds: float = 0.02) -> int | None:
        """Delete runs that ended before `cutoff`, `batch_size` per transaction, pausing between batches so
        triggers and claims get the write lock in between. Returns how many; None when another process is
        pruning (it will do the work)."""
        with self.exclusive() as held:
            if not held:
                return None
            total = 0
            while True:
                deleted = self.database.retry(lambda: self._delete_batch(cutoff, batch_size))
                total += deleted
                if deleted < batch_size:
                    return total
                time.sleep(pause_seconds)

    def _delete_batch(self, cutoff: datetime, batch_size: int) -> int:
        """One batch; returns how many runs it looked at (a full batch means there may be more)."""
        with self.database.session(write=True) as session:
            # Only ix_runs_finished here: finished_at is set exactly when a run ends. A status condition in SQL
            # would tempt SQLite into reading every ended run through ix_runs_queue and sorting them, per batch.
            rows = session.execute(select(Run.id, Run.status).where(Run.finished_at < cutoff)
                                   .order_by(Run.finished_at).limit(batch_size)).all()
            ids = [row.id for row in rows if row.status in TERMINAL]
            if ids:
                for table, column in ((RunLog, RunLog.run_id), (RunNode, RunNode.run_id), (RunLabel, RunLabel.run_id),
                                      (RunJoin, RunJoin.run_id), (RunCallback, RunCallback.run_id), (Run, Run.id)):
                    session.execute(delete(table).where(column.in_(ids)))
            return len(ids) if len(ids) < len(rows) else len(rows)

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Whether this process got the one pruning slot (held until the block ends): PostgreSQL's advisory lock,
        or for a SQLite file (one host by nature) an flock beside it."""
        if self.database.is_sqlite:
            with self._file_lock() as held:
                yield held
            return
        with self.database.engine.connect() as connection:
            locked = bool(connection.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": _PRUNE_LOCK_ID}).scalar())
            connection.commit()
            try:
                yield locked
            finally:
                if locked:
                    connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PRUNE_LOCK_ID})
                    connection.commit()

    @contextmanager
    def _file_lock(self) -> Iterator[bool]:
        database = self.database.url.database
        if not database or database == ":memory:":
            yield True
            return
        with open(Path(database).with_name(Path(database).name + ".prune-lock"), "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
