"""Ended runs written straight into a run store with the times, outcomes and rows a test chooses, for what reads
history (the stats endpoint, the dashboard's charts) to be checked against known numbers."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from app.runs.models import Run
from app.runs.store import RunStore

START = datetime(2025, 3, 1, 6, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class PastRun:
    """A run that took `seconds` and ended `status` on `backend`, having loaded `rows` per table; with `late`, a
    schedule's run that started that many seconds after its slot."""

    seconds: float
    status: str = "completed"
    backend: str = "local"
    rows: dict[str, int] = field(default_factory=dict)
    late: float | None = None


def add_past_runs(store: RunStore, target: str, runs: list[PastRun], kind: str = "connector",
                  start: datetime = START, every: timedelta = timedelta(hours=1)) -> list[str]:
    """Insert `runs` one `every` apart from `start`, oldest first; their ids in that order."""
    ids = []
    with store.db.session(write=True) as session:
        for index, past in enumerate(runs):
            created = start + index * every
            slot = None if past.late is None else created + timedelta(seconds=1 - past.late)
            run = Run(id=uuid.uuid4().hex, kind=kind, target=target, params={}, status=past.status,
                      backend=past.backend, concurrency_key=f"{kind}:{target}", attempts=1, created_at=created,
                      started_at=created + timedelta(seconds=1),
                      finished_at=created + timedelta(seconds=1 + past.seconds),
                      result={"rows": past.rows} if past.status == "completed" else None,
                      error=None if past.status == "completed" else {"code": "connector_failed", "message": "boom"},
                      source="api" if slot is None else "schedule", scheduled_for=slot)
            session.add(run)
            ids.append(run.id)
    return ids
