"""What `make deploy` registers about schedules: none in Prefect (no server needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from connectors.registry import ConnectorRegistry
from connectors.spec import ScheduleSpec
from flows.prefect.deploy import schedule_note


def test_deploy_says_prefect_gets_no_schedule_and_who_fires_the_declared_ones(tmp_path: Path):
    (tmp_path / "connectors.yaml").write_text("""
connectors:
  nightly:
    source: {kind: python, ref: "connectors.demo:numbers"}
    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}
  on_demand:
    source: {kind: python, ref: "connectors.demo:numbers"}
""")
    note = schedule_note(ConnectorRegistry.load(tmp_path / "connectors.yaml"))
    assert note.startswith("schedules: none registered in Prefect (the gateway is the only scheduler)")
    assert "fires the 1 declared (nightly)" in note and "flowgate-schedule" in note


@pytest.mark.parametrize("fields", [{}, {"cron": "* * * * *", "interval": 60}, {"interval": -1},
                                    {"cron": "0 * * * *", "timezone": "Mars/Olympus"}])
def test_a_schedule_needs_exactly_one_valid_rule(fields):
    with pytest.raises(ValidationError):
        ScheduleSpec(**fields)
