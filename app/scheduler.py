"""Scheduler: the loop that fires the slots of every connector's and workflow's `schedule`, in every gateway
process (the gateway is the only scheduler: Prefect deployments carry none).

Every process of every gateway runs it; none is elected. Each pass reads every schedule's shared state in one
query, works out what is due since the schedule's progress (`done_until`) under its catch-up policy, and hands
the slot to the dispatcher: the run is created in the transaction that moves the progress past the slot, and
the store refuses a second run of one slot (RunStore.create_slot_run), so whichever process comes first runs
it and the others find it dealt with. A process killed mid-pass leaves the slot to the others' next pass.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from app.dispatch import Dispatcher, SlotRun
from app.metrics import SCHEDULE_MISSED, SCHEDULE_SKIPPED, target_label
from app.runs.models import ScheduleState, utcnow
from app.runs.store import CREATED, SKIPPED, TAKEN, WAITING, RunStore
from connectors.recurrence import Recurrence
from connectors.spec import ScheduleSpec
from flows.loop import Loop

log = logging.getLogger(__name__)

MISSED_COUNT_CAP = 10_000  # missed slots are counted up to this many per catch-up (a 1 s interval down a day)
UPCOMING = 5  # next fire times shown per schedule


@dataclass(frozen=True)
class Schedule:
    """One connector's or workflow's schedule, as its YAML declares it."""

    kind: str  # connector or workflow
    target: str
    spec: ScheduleSpec
    callback_url: str | None = None

    @cached_property
    def rule(self) -> Recurrence:
        return self.spec.recurrence


@dataclass(frozen=True)
class Plan:
    """What a pass does with a schedule's due slots: count the first `missed` (up to `missed_until`) as missed,
    then run `fire`; `more` says whether further due slots wait behind it (catch_up: all)."""

    missed: int = 0
    missed_until: datetime | None = None
    fire: datetime | None = None
    more: bool = False


def plan(rule: Recurrence, spec: ScheduleSpec, done_until: datetime, now: datetime, grace: timedelta) -> Plan:
    """The slots in (done_until, now] under the schedule's catch-up policy: `latest` runs the newest (late, if
    the gateways were down), `all` each of the newest `max_catch_up`, oldest first, `none` only one due within
    `grace` (on time). The others are missed."""
    keep = rule.newest(done_until, now, spec.max_catch_up if spec.catch_up == "all" else 1)
    if not keep:
        return Plan()
    newest = keep[-1]
    if spec.catch_up == "none" and now - newest > grace:
        keep = []
    before = rule.newest(done_until, keep[0] - timedelta(microseconds=1), 1) if keep else [newest]
    missed = rule.count(done_until, before[0], MISSED_COUNT_CAP) if before else 0
    return Plan(missed=missed, missed_until=before[0] if missed else None, fire=keep[0] if keep else None,
                more=len(keep) > 1)


def declared_schedules(connectors: Iterable[Any], workflows: Iterable[Any]) -> list[Schedule]:
    """The schedules the connectors and workflow files declare (those with `active: false` included)."""
    return [Schedule(kind, spec.id, spec.schedule, spec.callback_url)
            for kind, specs in (("connector", connectors), ("workflow", workflows))
            for spec in specs if spec.schedule is not None]


class Scheduler(Loop):
    """Fires due slots every pass; wakes at the next slot (at most `max_wait` apart).

    A pass reads the store's state of the schedules that are due only (a paused, resumed or already fired slot is
    seen when it is due, whichever process changed it), so a thousand schedules cost a pass almost nothing between
    their slots: reading every state each second cost 6 % of a core for 1,000 (bench/schedules.py)."""

    def __init__(self, schedules: list[Schedule], store: RunStore, dispatcher: Dispatcher, grace_seconds: float,
                 clock: Callable[[], datetime] = utcnow, max_wait: float = 1.0):
        super().__init__("scheduler", every=max_wait)
        self.schedules = {(schedule.kind, schedule.target): schedule for schedule in schedules}
        self.store = store
        self.dispatcher = dispatcher
        self.grace = timedelta(seconds=grace_seconds)
        self.clock = clock
        self.max_wait = max_wait
        # When each active schedule next needs a look: None until the first pass reads its state.
        self._due_at: dict[tuple[str, str], datetime | None] = {
            key: None for key, schedule in self.schedules.items() if schedule.spec.active}

    @property
    def enabled(self) -> bool:
        """No schedule declared: nothing to fire."""
        return bool(self.schedules)

    def get(self, kind: str, target: str) -> Schedule | None:
        """The declared schedule of a connector or workflow."""
        return self.schedules.get((kind, target))

    def next_delay(self) -> float:
        if any(at is None for at in self._due_at.values()):
            return 0.01  # a schedule whose state no pass has read yet
        now = self.clock()  # a slot that must wait (due now) is looked at again within max_wait
        later = [at for at in self._due_at.values() if at is not None and at > now]
        return max(min((min(later) - now).total_seconds(), self.max_wait), 0.01) if later else self.max_wait

    def run_once(self) -> bool:
        """One pass over the schedules due now; True when one has further due slots at once."""
        now = self.clock()
        due = [key for key, at in self._due_at.items() if at is None or at <= now]
        if not due:
            return False
        states = self.store.schedules.states(None if len(due) == len(self._due_at) else due)
        if missing := [key for key in due if key not in states]:  # schedules no gateway has seen yet
            states.update(self.store.schedules.ensure_all(missing, now))
        more = False
        for key in due:
            schedule = self.schedules[key]
            state = states[key]
            try:  # a paused schedule is looked at again at its next slot (resuming runs none before it)
                self._due_at[key], again = (self._next_slot(schedule, now), False) if state.paused else \
                    self.tick(schedule, state, now)
            except Exception:  # one schedule's failure (a forced Prefect that is down) must not hold the others
                log.exception("firing the schedule of %s %s failed; the next pass tries again",
                              schedule.kind, schedule.target)
                self._due_at[key], again = now, False
            more |= again
        return more

    def tick(self, schedule: Schedule, state: ScheduleState, now: datetime) -> tuple[datetime, bool]:
        """Deal with one schedule's due slots; returns when it next needs a look (the next pass when its slot must
        wait or another process moved it, else its next slot), and whether another slot is due at once (catch_up:
        all)."""
        spec, done_until = schedule.spec, state.done_until
        soon = now, False  # the next pass
        step = plan(schedule.rule, spec, done_until, now, self.grace)
        if step.missed_until is not None:  # `missed` slots, up to it
            if not self.store.schedules.miss(schedule.kind, schedule.target, done_until, step.missed_until,
                                             step.missed):
                return soon  # another process dealt with them: read again next pass
            done_until = step.missed_until
            SCHEDULE_MISSED.labels(schedule.kind, target_label(schedule.target)).inc(step.missed)
            log.warning("%s %s: %d slot(s) up to %s passed while no gateway ran them; missed (catch_up: %s)",
                        schedule.kind, schedule.target, step.missed, step.missed_until.isoformat(), spec.catch_up)
        if step.fire is None:
            return self._next_slot(schedule, now), False
        record = {**spec.declared(), "late_seconds": round(max((now - step.fire).total_seconds(), 0.0), 3)}
        what, run = self.dispatcher.fire_slot(SlotRun(
            schedule.kind, schedule.target, step.fire, record, schedule.callback_url, done_until,
            skip_if_waiting=spec.catch_up != "all"))
        if what == SKIPPED:
            SCHEDULE_SKIPPED.labels(schedule.kind, target_label(schedule.target)).inc()
            log.info("%s %s: the slot of %s is skipped: a run of the schedule is already waiting",
                     schedule.kind, schedule.target, step.fire.isoformat())
        if what == CREATED and step.more:
            return now, True
        return soon if what in (WAITING, TAKEN) else (self._next_slot(schedule, now), False)

    @staticmethod
    def _next_slot(schedule: Schedule, now: datetime) -> datetime:
        return schedule.rule.after(now) or now + timedelta(days=3650)  # a rule that ends: never again

    def upcoming(self, schedule: Schedule, count: int = UPCOMING) -> list[datetime]:
        """The schedule's next fire times, in its time zone."""
        return schedule.rule.upcoming(self.clock(), count)
