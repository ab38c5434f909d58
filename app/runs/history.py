"""A connector's or workflow's recent runs as points to draw: how long each took, where it ran, what it loaded.

One query per call, a range of ix_runs_target_created read backwards from the newest run: the same few rows
whether the store keeps a thousand runs or a million (bench/store_scale.py measures it on both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select

from app.runs.models import Run
from flows.database import Database

_COLUMNS = (Run.id, Run.status, Run.backend, Run.created_at, Run.started_at, Run.finished_at, Run.result,
            Run.scheduled_for)


@dataclass(frozen=True)
class RunPoint:
    """One run, reduced to what a chart of many runs shows."""

    id: str
    status: str
    backend: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rows: dict[str, int] = field(default_factory=dict)
    scheduled_for: datetime | None = None

    @property
    def duration_seconds(self) -> float | None:
        """From start to end; None until it ended (or when it never started)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max((self.finished_at - self.started_at).total_seconds(), 0.0)

    @property
    def fire_lag_seconds(self) -> float | None:
        """A scheduled run's start after its slot (as the scheduler's metric counts it); None for the others."""
        if self.scheduled_for is None or self.started_at is None:
            return None
        return max((self.started_at - self.scheduled_for).total_seconds(), 0.0)


class RunHistory:
    """Recent runs of one target, read-only; a part of the RunStore (`store.history`)."""

    def __init__(self, db: Database):
        self.db = db

    def recent(self, kind: str, target: str, limit: int) -> list[RunPoint]:
        """The target's newest `limit` runs, oldest first (the order a chart reads left to right)."""
        with self.db.session() as session:
            rows = session.execute(recent_query(kind, target, limit)).all()
        return [_point(row) for row in reversed(rows)]


def recent_query(kind: str, target: str, limit: int) -> Select[Any]:
    """The newest `limit` runs of a target, newest first: ix_runs_target_created read backwards (the kind, rarely
    different under one target name, is checked on the rows read)."""
    return (select(*_COLUMNS).where(Run.target == target, Run.kind == kind)
            .order_by(Run.created_at.desc(), Run.id.desc()).limit(limit))


def _point(row: Any) -> RunPoint:
    loaded = (row.result or {}).get("rows") or {}
    return RunPoint(id=row.id, status=row.status, backend=row.backend, created_at=row.created_at,
                    started_at=row.started_at, finished_at=row.finished_at,
                    rows={str(table): int(count) for table, count in loaded.items() if isinstance(count, (int, float))},
                    scheduled_for=row.scheduled_for)
