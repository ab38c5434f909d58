"""Executor registrations in the store: each gateway process's executor and its heartbeat, the shared view of
local capacity that readiness and metrics read."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select

from app.runs.models import ACTIVE_LOCAL, Executor, Run, utcnow
from flows.database import Database


@dataclass(frozen=True)
class Capacity:
    """The executors alive right now, across every process that shares the store."""

    executors: int
    slots: int
    busy: int


class ExecutorStore:
    """Heartbeats of the executors alive, with their slots and how many are busy."""

    def __init__(self, database: Database):
        self.database = database

    def heartbeat(self, executor_id: str, hostname: str, pid: int, slots: int, busy: int) -> None:
        """Record that an executor is alive, with its slots and how many are busy."""

        def attempt() -> None:
            with self.database.session(write=True) as session:
                row = session.get(Executor, executor_id)
                if row is None:
                    session.add(Executor(id=executor_id, hostname=hostname, pid=pid, slots=slots, busy=busy,
                                         started_at=utcnow(), heartbeat_at=utcnow()))
                else:
                    row.busy, row.slots, row.heartbeat_at = busy, slots, utcnow()

        self.database.retry(attempt)

    def remove(self, executor_id: str) -> None:
        """Forget an executor that stopped."""
        self.database.retry(lambda: self._delete(Executor.id == executor_id))

    def capacity(self, stale_after_seconds: float) -> Capacity:
        """Executors with a heartbeat newer than `stale_after_seconds`, and their slots."""
        since = utcnow() - timedelta(seconds=stale_after_seconds)
        with self.database.session() as session:
            executors, slots, busy = session.execute(
                select(func.count(), func.coalesce(func.sum(Executor.slots), 0),
                       func.coalesce(func.sum(Executor.busy), 0)).where(Executor.heartbeat_at >= since)).one()
        return Capacity(executors=executors, slots=slots, busy=busy)

    def less_busy_than(self, executor_id: str, busy: int, slots: int, stale_after_seconds: float) -> bool:
        """Whether another live executor has a smaller share of its slots busy than `busy` of `slots`.

        Busy counts come from the runs each executor holds now, not from heartbeats (seconds old)."""
        since = utcnow() - timedelta(seconds=stale_after_seconds)
        held = (select(Run.lease_owner, func.count().label("busy")).where(ACTIVE_LOCAL)
                .group_by(Run.lease_owner).subquery())
        with self.database.session() as session:
            others = session.execute(
                select(Executor.slots, func.coalesce(held.c.busy, 0))
                .outerjoin(held, held.c.lease_owner == Executor.id)
                .where(Executor.heartbeat_at >= since, Executor.id != executor_id, Executor.slots > 0)).all()
        return any(other_busy * slots < busy * other_slots for other_slots, other_busy in others)

    def forget_stale(self, stale_after_seconds: float) -> None:
        """Drop executors that stopped heartbeating long ago."""
        since = utcnow() - timedelta(seconds=stale_after_seconds)
        self.database.retry(lambda: self._delete(Executor.heartbeat_at < since))

    def _delete(self, condition: Any) -> None:
        with self.database.session(write=True) as session:
            session.execute(delete(Executor).where(condition))
