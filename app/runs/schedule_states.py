"""Schedules in the store: each one's shared state (paused, how far its slots are dealt with, what was missed or
skipped) and its last scheduled run. A slot is dealt with by whoever moves `done_until` past it: every such move
is a compare-and-set on the value read, so a slot is counted, skipped or run by one process only."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import selectinload

from app.runs.models import SCHEDULED, Run, ScheduleState, utcnow
from flows.database import Database

_ADVANCE = update(ScheduleState).where(
    ScheduleState.kind == bindparam("the_kind"), ScheduleState.target == bindparam("the_target"),
    ScheduleState.done_until == bindparam("read"), ScheduleState.paused.is_(False)).values(
    done_until=bindparam("slot"), updated_at=bindparam("now"))


def advance(connection: Connection, kind: str, target: str, done_until: datetime, slot: datetime,
            skipped: bool = False, missed: int = 0) -> bool:
    """Move a schedule's progress from `done_until` (as read) to `slot`, counting a skipped slot or missed ones;
    False when another process moved it first or the schedule is paused."""
    if not skipped and not missed:  # each slot of each schedule: one statement built once (1,000 schedules' slot
        # made this statement anew 1,000 times: a third of the slot's CPU, bench/schedules.py)
        return connection.execute(_ADVANCE, {"the_kind": kind, "the_target": target, "read": done_until,
                                             "slot": slot, "now": utcnow()}).rowcount == 1
    values: dict[str, Any] = {"done_until": slot, "updated_at": utcnow()}
    if skipped:
        values.update(skipped=ScheduleState.skipped + 1, last_skipped_for=slot)
    if missed:
        values["missed"] = ScheduleState.missed + missed
    return connection.execute(update(ScheduleState).where(
        ScheduleState.kind == kind, ScheduleState.target == target, ScheduleState.done_until == done_until,
        ScheduleState.paused.is_(False)).values(**values)).rowcount == 1


class ScheduleStore:
    """The state of every schedule, shared by every process and gateway on the store."""

    def __init__(self, database: Database):
        self.database = database

    def states(self, keys: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], ScheduleState]:
        """The states of the schedules `keys` (kind, target), every one's by default: one query per scheduler pass."""
        query = select(ScheduleState)
        if keys is not None:
            query = query.where(tuple_(ScheduleState.kind, ScheduleState.target).in_(keys))
        with self.database.session() as session:
            return {(state.kind, state.target): state for state in session.scalars(query)}

    def get(self, kind: str, target: str) -> ScheduleState | None:
        """One schedule's state (None: no gateway has seen it yet)."""
        with self.database.session() as session:
            return session.get(ScheduleState, (kind, target))

    def ensure(self, kind: str, target: str, first_seen: datetime) -> ScheduleState:
        """The schedule's state, made when missing with its slots dealt with until `first_seen`: a schedule runs
        none of the slots before a gateway first saw it."""
        return self.ensure_all([(kind, target)], first_seen)[(kind, target)]

    def ensure_all(self, keys: list[tuple[str, str]], first_seen: datetime) -> dict[tuple[str, str], ScheduleState]:
        """`ensure` for many schedules in one transaction (a gateway's first pass over a thousand new schedules was
        a thousand transactions)."""
        insert = (sqlite.insert if self.database.is_sqlite else postgresql.insert)(ScheduleState)
        now = utcnow()
        rows = [{"kind": kind, "target": target, "paused": False, "done_until": first_seen, "missed": 0,
                 "skipped": 0, "updated_at": now} for kind, target in keys]

        def attempt() -> dict[tuple[str, str], ScheduleState]:
            with self.database.session(write=True) as session:
                session.execute(insert.on_conflict_do_nothing(index_elements=["kind", "target"]), rows)
                return {(state.kind, state.target): state for state in session.scalars(
                    select(ScheduleState).where(tuple_(ScheduleState.kind, ScheduleState.target).in_(keys)))}

        return self.database.retry(attempt) if keys else {}

    def pause(self, kind: str, target: str, by: str | None) -> ScheduleState:
        """Fire no slot of the schedule until it is resumed (kept across restarts, seen by every gateway)."""
        def attempt() -> ScheduleState:
            with self.database.session(write=True) as session:
                state = session.get_one(ScheduleState, (kind, target))  # made by ensure, below
                if not state.paused:
                    state.paused, state.paused_at, state.paused_by, state.updated_at = True, utcnow(), by, utcnow()
                return state

        self.ensure(kind, target, utcnow())
        return self.database.retry(attempt)

    def resume(self, kind: str, target: str, now: datetime) -> ScheduleState:
        """Fire its slots again from `now` on: the slots that passed while it was paused are not run."""
        def attempt() -> ScheduleState:
            with self.database.session(write=True) as session:
                state = session.get_one(ScheduleState, (kind, target))
                if state.paused:
                    state.paused, state.paused_at, state.paused_by, state.updated_at = False, None, None, utcnow()
                    state.done_until = max(state.done_until, now)
                return state

        self.ensure(kind, target, now)
        return self.database.retry(attempt)

    def miss(self, kind: str, target: str, done_until: datetime, until: datetime, count: int) -> bool:
        """Count `count` slots up to `until` as missed (they passed while no gateway ran); False when another
        process dealt with them first."""
        def attempt() -> bool:
            with self.database.writer.begin() as connection:
                return advance(connection, kind, target, done_until, until, missed=count)

        return self.database.retry(attempt)

    def last_run(self, kind: str, target: str) -> Run | None:
        """The schedule's newest run, by slot (uq_runs_slot, read backwards)."""
        with self.database.session() as session:
            return session.scalars(select(Run).options(selectinload(Run.callback)).where(
                Run.kind == kind, Run.target == target, SCHEDULED).order_by(Run.scheduled_for.desc()).limit(1)).first()
