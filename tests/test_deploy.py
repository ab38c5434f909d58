"""How connectors.yaml schedules become Prefect schedules (no server needed)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from connectors.spec import ScheduleSpec
from flows.prefect.deploy import prefect_schedule


def test_cron_interval_and_rrule_keep_their_time_zone():
    cron = prefect_schedule(ScheduleSpec(cron="0 6 * * 1-5", timezone="Europe/Berlin"))
    assert (cron.cron, cron.timezone) == ("0 6 * * 1-5", "Europe/Berlin")
    interval = prefect_schedule(ScheduleSpec(interval=900))
    assert interval.interval == timedelta(seconds=900)
    rrule = prefect_schedule(ScheduleSpec(rrule="FREQ=WEEKLY;BYDAY=MO", timezone="America/New_York", active=False))
    assert (rrule.rrule, rrule.timezone, rrule.active) == ("FREQ=WEEKLY;BYDAY=MO", "America/New_York", False)


@pytest.mark.parametrize("fields", [{}, {"cron": "* * * * *", "interval": 60}, {"interval": -1},
                                    {"cron": "0 * * * *", "timezone": "Mars/Olympus"}])
def test_a_schedule_needs_exactly_one_valid_rule(fields):
    with pytest.raises(ValidationError):
        ScheduleSpec(**fields)
