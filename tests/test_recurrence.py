"""Slots of cron, interval and rrule schedules, in their time zone and across DST (connectors/recurrence.py)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import takewhile
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from connectors.recurrence import RecurrenceError, recurrence
from connectors.spec import ScheduleSpec

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def slots_on(rule, day: datetime, zone=BERLIN) -> list[datetime]:
    """The slots whose local date is `day` (a local midnight), in UTC."""
    start = day.replace(tzinfo=zone).astimezone(UTC)
    end = (day + timedelta(days=1)).replace(tzinfo=zone).astimezone(UTC)
    return list(takewhile(lambda slot: slot < end, rule.forwards(start - timedelta(microseconds=1))))


SPRING_FORWARD = datetime(2025, 3, 30)  # Berlin: 02:00 CET -> 03:00 CEST
FALL_BACK = datetime(2025, 10, 26)  # Berlin: 03:00 CEST -> 02:00 CET, 02:00-02:59 happens twice


@pytest.mark.parametrize("rule", [recurrence(cron="0 2 * * *", zone="Europe/Berlin"),
                                  recurrence(rrule="FREQ=DAILY;BYHOUR=2;BYMINUTE=0;BYSECOND=0", zone="Europe/Berlin")],
                         ids=["cron", "rrule"])
def test_a_2_am_schedule_in_berlin_fires_once_on_both_dst_days(rule):
    assert slots_on(rule, SPRING_FORWARD) == [utc(2025, 3, 30, 1)]  # 02:00 does not exist: 03:00 CEST
    assert slots_on(rule, FALL_BACK) == [utc(2025, 10, 26, 0)]  # the first 02:00 (CEST), not the second too
    assert slots_on(rule, datetime(2025, 7, 1)) == [utc(2025, 7, 1, 0)]
    assert slots_on(rule, datetime(2025, 1, 15)) == [utc(2025, 1, 15, 1)]


def test_croniter_would_fire_2_am_twice_on_the_fall_back_day():
    """Why cronsim: the other installed cron library gets the fall-back day wrong (if it is fixed, fine)."""
    from croniter import croniter

    it = croniter("0 2 * * *", datetime(2025, 10, 25, 12, tzinfo=BERLIN))
    fired = [it.get_next(datetime) for _ in range(3)]
    on_the_day = [slot for slot in fired if slot.astimezone(BERLIN).date() == FALL_BACK.date()]
    assert len(on_the_day) in (1, 2)  # 2 with croniter 7.0.0; our schedule's own test above requires 1


def test_an_hourly_cron_follows_absolute_hours_across_dst():
    rule = recurrence(cron="0 * * * *", zone="Europe/Berlin")
    assert len(slots_on(rule, SPRING_FORWARD)) == 23  # the day has 23 hours
    assert len(slots_on(rule, FALL_BACK)) == 25


def test_an_interval_is_wall_clock_independent():
    rule = recurrence(interval=3600, zone="Europe/Berlin")
    fired = slots_on(rule, FALL_BACK)
    assert len(fired) == 25 and all(b - a == timedelta(hours=1) for a, b in zip(fired, fired[1:]))
    two = recurrence(interval=2)
    assert list(two.newest(utc(2025, 1, 1, 0, 0, 0), utc(2025, 1, 1, 0, 0, 7), 10)) == [
        utc(2025, 1, 1, 0, 0, 2), utc(2025, 1, 1, 0, 0, 4), utc(2025, 1, 1, 0, 0, 6)]
    assert two.after(utc(2025, 1, 1, 0, 0, 6)) == utc(2025, 1, 1, 0, 0, 8)  # strictly after
    assert two.count(utc(2025, 1, 1), utc(2025, 1, 2), cap=10**6) == 43200


def test_a_wall_clock_rrule_fires_a_time_the_gap_moved_once():
    rule = recurrence(rrule="FREQ=HOURLY", zone="Europe/Berlin")
    spring = slots_on(rule, SPRING_FORWARD)
    assert len(spring) == len(set(spring)) == 23  # 02:00 became 03:00 CEST, which also comes as itself: once


def test_a_minutely_rrule_from_2020_answers_at_once():
    rule = recurrence(rrule="FREQ=MINUTELY;INTERVAL=7", zone="Europe/Berlin")
    now = utc(2026, 6, 1, 12, 0, 30)
    nxt = rule.after(now)
    wall = nxt.astimezone(BERLIN).replace(tzinfo=None)
    assert (wall - datetime(2020, 1, 1)) % timedelta(minutes=7) == timedelta(0)  # 7-minute steps of local time from
    assert nxt - now <= timedelta(minutes=7)  # the default start, 2020-01-01 00:00, kept although restarted later
    assert rule.newest(None, now, 1) == [nxt - timedelta(minutes=7)]


def test_backwards_and_forwards_agree():
    for rule in (recurrence(cron="*/20 1-3 * * *", zone="Europe/Berlin"),
                 recurrence(rrule="FREQ=WEEKLY;BYDAY=MO,TH;BYHOUR=9", zone="America/New_York"),
                 recurrence(interval=5400)):
        start, end = utc(2025, 10, 20), utc(2025, 11, 10)
        forwards = list(takewhile(lambda slot, end=end: slot <= end, rule.forwards(start)))
        assert rule.newest(start, end, 10_000) == forwards
        assert rule.count(start, end, 10_000) == len(forwards)
        assert rule.newest(start, end, 2) == forwards[-2:]


def test_upcoming_slots_are_given_in_the_schedules_zone():
    rule = recurrence(cron="30 6 * * 1-5", zone="Europe/Berlin")
    nxt = rule.upcoming(utc(2025, 10, 24, 12), 3)  # a Friday
    assert [slot.isoformat() for slot in nxt] == ["2025-10-27T06:30:00+01:00", "2025-10-28T06:30:00+01:00",
                                                  "2025-10-29T06:30:00+01:00"]


def test_a_finished_rrule_has_no_next_slot():
    rule = recurrence(rrule="DTSTART:20250101T000000\nRRULE:FREQ=DAILY;COUNT=3")
    assert rule.after(utc(2025, 1, 2, 12)) == utc(2025, 1, 3)
    assert rule.after(utc(2025, 1, 3)) is None


@pytest.mark.parametrize(("fields", "field"), [
    ({"cron": "0 2 * *"}, "cron"), ({"cron": "0 25 * * *"}, "cron"), ({"rrule": "FREQ=SOMETIMES"}, "rrule"),
    ({"interval": 60, "timezone": "Mars/Olympus"}, "timezone"), ({"interval": 0}, "interval"),
    ({"interval": 60, "catch_up": "most"}, "catch_up"), ({"interval": 60, "max_catch_up": 0}, "max_catch_up"),
])
def test_a_bad_schedule_names_its_field(fields, field):
    with pytest.raises(ValidationError) as caught:
        ScheduleSpec(**fields)
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_unreadable_expressions_raise_a_recurrence_error():
    with pytest.raises(RecurrenceError):
        recurrence(cron="every day")
