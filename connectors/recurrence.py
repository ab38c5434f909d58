"""Recurrence: the instants a schedule fires (its slots), from cron, an interval or an RFC 5545 rrule, in UTC.

Cron and rrule are read in the schedule's time zone and follow its clock across DST; an interval is a fixed
number of seconds from the Unix epoch, whatever the clocks say. The expressions are parsed by libraries, never
here: cron by cronsim, rrule by dateutil. Not croniter: croniter 7.0.0 fires `0 2 * * *` in Europe/Berlin twice
on the fall-back day (26 October 2025: 00:00 and 01:00 UTC), cronsim once, and both fire it once (at 03:00
CEST) on the spring-forward day, as Vixie cron does.

An rrule is iterated by dateutil from its start (DTSTART, else 2020-01-01 00:00 local), which for a rule of
minutes from 2020 took 49 s per lookup here: a rule that steps in fixed lengths (weeks down to seconds) without
COUNT is restarted a whole number of its periods later, which changes none of its instants. Its wall-clock
times are made instants the way RFC 5545 says: a time in a spring-forward gap moves past the gap, an
ambiguous one is its first occurrence, and two that become one instant fire once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError
from dateutil import rrule as rr

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
RRULE_DEFAULT_START = datetime(2020, 1, 1)  # local wall-clock time of the schedule's zone
_SECOND = timedelta(seconds=1)
_DST_MARGIN = timedelta(hours=3)  # more than any zone's offset change: a wall-clock window around an instant
_FIXED_STEPS = {rr.WEEKLY: timedelta(weeks=1), rr.DAILY: timedelta(days=1), rr.HOURLY: timedelta(hours=1),
                rr.MINUTELY: timedelta(minutes=1), rr.SECONDLY: timedelta(seconds=1)}
_ROUGH_STEPS = {rr.YEARLY: timedelta(days=366), rr.MONTHLY: timedelta(days=31), **_FIXED_STEPS}


class RecurrenceError(ValueError):
    """The expression cannot be read; the message says why."""


class Recurrence(ABC):
    """The slots of one schedule. Every instant taken or given is timezone-aware; slots are given in UTC."""

    def __init__(self, zone: ZoneInfo):
        self.zone = zone

    @abstractmethod
    def forwards(self, after: datetime) -> Iterator[datetime]:
        """Slots strictly after `after`, oldest first (ends only when the rule does)."""

    @abstractmethod
    def backwards(self, until: datetime) -> Iterator[datetime]:
        """Slots at or before `until`, newest first."""

    def after(self, moment: datetime) -> datetime | None:
        """The first slot strictly after `moment` (None: the rule has ended)."""
        return next(self.forwards(moment), None)

    def upcoming(self, moment: datetime, count: int) -> list[datetime]:
        """The next `count` slots after `moment`, in the schedule's time zone."""
        slots = []
        for slot in self.forwards(moment):
            slots.append(slot.astimezone(self.zone))
            if len(slots) == count:
                break
        return slots

    def newest(self, start: datetime | None, end: datetime, limit: int) -> list[datetime]:
        """The newest `limit` slots in (start, end], oldest first (start None: no lower bound)."""
        found: list[datetime] = []
        for slot in self.backwards(end):
            if (start is not None and slot <= start) or len(found) == limit:
                break
            found.append(slot)
        return found[::-1]

    def count(self, start: datetime, end: datetime, cap: int) -> int:
        """How many slots lie in (start, end], counted up to `cap`."""
        counted = 0
        for slot in self.forwards(start):
            if slot > end or counted == cap:
                break
            counted += 1
        return counted


class CronRecurrence(Recurrence):
    """A cron expression (5 fields, or 6 with seconds) in a time zone, read by cronsim."""

    def __init__(self, expression: str, zone: ZoneInfo):
        super().__init__(zone)
        self.expression = expression
        try:
            CronSim(expression, datetime(2020, 1, 1, tzinfo=zone))
        except CronSimError as exc:
            raise RecurrenceError(f"not a cron expression: {exc}") from None

    def forwards(self, after: datetime) -> Iterator[datetime]:
        for slot in CronSim(self.expression, after.astimezone(self.zone)):
            yield slot.astimezone(timezone.utc)

    def backwards(self, until: datetime) -> Iterator[datetime]:
        # cronsim walks back from a moment it excludes; slots are whole seconds, so from the next whole second.
        start = until.astimezone(self.zone).replace(microsecond=0) + _SECOND
        for slot in CronSim(self.expression, start, reverse=True):
            yield slot.astimezone(timezone.utc)


class IntervalRecurrence(Recurrence):
    """Every `seconds` seconds from the Unix epoch: absolute time, no time zone involved."""

    def __init__(self, seconds: float):
        super().__init__(ZoneInfo("UTC"))
        self.step = round(seconds * 1_000_000)  # microseconds: exact arithmetic
        if self.step <= 0:
            raise RecurrenceError("the interval must be at least a microsecond")

    def _index(self, moment: datetime) -> int:
        """The index of the newest slot at or before `moment`."""
        return ((moment - EPOCH) // timedelta(microseconds=1)) // self.step

    def _slot(self, index: int) -> datetime:
        return EPOCH + timedelta(microseconds=index * self.step)

    def forwards(self, after: datetime) -> Iterator[datetime]:
        index = self._index(after) + 1
        while True:
            yield self._slot(index)
            index += 1

    def backwards(self, until: datetime) -> Iterator[datetime]:
        index = self._index(until)
        while index >= 0:
            yield self._slot(index)
            index -= 1

    def count(self, start: datetime, end: datetime, cap: int) -> int:
        return max(0, min(self._index(end) - self._index(start), cap))


class RRuleRecurrence(Recurrence):
    """An RFC 5545 recurrence rule in a time zone, read by dateutil (see the module docstring)."""

    def __init__(self, text: str, zone: ZoneInfo):
        super().__init__(zone)
        self.text = text
        try:
            self.rule = rr.rrulestr(text, dtstart=RRULE_DEFAULT_START, ignoretz=True)
        except (ValueError, TypeError) as exc:
            raise RecurrenceError(f"not an RFC 5545 rule: {exc}") from None
        # The parts are private attributes of dateutil's rule and rule set, which its stubs leave out
        rule: Any = self.rule
        single = isinstance(rule, rr.rrule)
        if not single and not rule._rrule:  # noqa: SLF001
            raise RecurrenceError("needs an RRULE line (RDATE alone is not a recurrence)")
        self.start = rule._dtstart if single else min(r._dtstart for r in rule._rrule)  # noqa: SLF001
        freq = rule._freq if single else min(r._freq for r in rule._rrule)  # noqa: SLF001
        interval = rule._interval if single else 1  # noqa: SLF001
        self.window = _ROUGH_STEPS[freq] * interval * 64
        # Restartable later without changing an instant: fixed-length steps, and no COUNT counted from the start.
        self.period = (_FIXED_STEPS[freq] * interval
                       if single and freq in _FIXED_STEPS and rule._count is None else None)  # noqa: SLF001

    def _local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone).replace(tzinfo=None)

    def _instant(self, wall: datetime) -> datetime:
        # fold=0: an ambiguous time is its first occurrence; a time in a gap takes the offset before it, which
        # puts it past the gap.
        return wall.replace(tzinfo=self.zone).astimezone(timezone.utc)

    def _rule_from(self, wall: datetime) -> rr.rrule | rr.rruleset:
        """The same rule, restarted at the last whole period before `wall` when that is safe."""
        if self.period is None or wall <= self.start or not isinstance(self.rule, rr.rrule):  # a period: one rule
            return self.rule
        periods = (wall - self.start) // self.period
        return self.rule.replace(dtstart=self.start + self.period * max(periods - 1, 0))

    def forwards(self, after: datetime) -> Iterator[datetime]:
        wall = self._local(after) - _DST_MARGIN
        last = None
        for occurrence in self._rule_from(wall).xafter(wall, inc=True):
            slot = self._instant(occurrence)
            if slot > after and (last is None or slot > last):
                last = slot
                yield slot

    def backwards(self, until: datetime) -> Iterator[datetime]:
        high = self._local(until) + _DST_MARGIN
        last = None
        while high >= self.start:
            low = high - self.window
            chunk = [o for o in self._rule_from(low).between(low, high, inc=True) if low < o <= high]
            for occurrence in reversed(chunk):
                slot = self._instant(occurrence)
                if slot <= until and (last is None or slot < last):
                    last = slot
                    yield slot
            high = low


def recurrence(cron: str | None = None, interval: float | None = None, rrule: str | None = None,
               zone: str = "UTC") -> Recurrence:
    """The recurrence of whichever one of cron, interval or rrule is given."""
    if cron is not None:
        return CronRecurrence(cron, ZoneInfo(zone))
    if interval is not None:
        return IntervalRecurrence(interval)
    if rrule is not None:
        return RRuleRecurrence(rrule, ZoneInfo(zone))
    raise RecurrenceError("give one of cron, interval or rrule")
