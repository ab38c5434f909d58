"""The scheduler with a fake clock on a real run store: what fires when, catch-up policies, skipping, pause and
resume, and one run per slot whoever fires it (app/scheduler.py, RunStore.create_slot_run)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from app import create_app
from app.runs.models import Run
from app.runs.store import TAKEN, NewRun
from app.scheduler import plan
from connectors.recurrence import recurrence
from connectors.spec import ScheduleSpec
from tests.support.clock import Clock
from tests.support.waiting import wait_until
from tests.support.workdir import CONNECTORS_YAML

UTC = timezone.utc
GRACE = timedelta(seconds=60)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- the plan of one pass (pure) -------------------------------------------------------------------------------

HOURLY = recurrence(cron="0 * * * *")


def hourly(**fields) -> ScheduleSpec:
    return ScheduleSpec(cron="0 * * * *", **fields)


def test_a_slot_due_now_fires_on_time_and_nothing_is_missed():
    step = plan(HOURLY, hourly(), at(2025, 5, 1, 9, 0), at(2025, 5, 1, 10, 0, 0, 300_000), GRACE)
    assert (step.fire, step.missed, step.more) == (at(2025, 5, 1, 10), 0, False)
    assert plan(HOURLY, hourly(), at(2025, 5, 1, 10, 0), at(2025, 5, 1, 10, 59), GRACE).fire is None


def test_latest_runs_the_newest_missed_slot_once_and_counts_the_rest_missed():
    step = plan(HOURLY, hourly(), at(2025, 5, 1, 10), at(2025, 5, 1, 15, 30), GRACE)
    assert (step.fire, step.missed, step.missed_until) == (at(2025, 5, 1, 15), 4, at(2025, 5, 1, 14))


def test_all_runs_the_newest_max_catch_up_slots_oldest_first():
    step = plan(HOURLY, hourly(catch_up="all", max_catch_up=3), at(2025, 5, 1, 10), at(2025, 5, 1, 15, 30), GRACE)
    assert (step.fire, step.missed, step.missed_until, step.more) == (at(2025, 5, 1, 13), 2, at(2025, 5, 1, 12), True)


def test_none_runs_only_a_slot_due_within_the_grace():
    late = plan(HOURLY, hourly(catch_up="none"), at(2025, 5, 1, 10), at(2025, 5, 1, 15, 30), GRACE)
    assert (late.fire, late.missed, late.missed_until) == (None, 5, at(2025, 5, 1, 15))
    on_time = plan(HOURLY, hourly(catch_up="none"), at(2025, 5, 1, 10), at(2025, 5, 1, 15, 0, 10), GRACE)
    assert (on_time.fire, on_time.missed) == (at(2025, 5, 1, 15), 4)


# --- the scheduler on a store ----------------------------------------------------------------------------------

def gateway(workdir: Path, config: dict, schedule: str, clock: Clock, name: str = "ticking", also: str = "",
            **extra: str):
    """A gateway (not started) whose connector `name` has `schedule` (beside the connectors `also` declares), its
    scheduler on `clock`."""
    (workdir / "connectors.yaml").write_text(CONNECTORS_YAML + also + f"""
  {name}:
    source: {{kind: python, ref: "connectors.demo:numbers", args: {{n: 1}}}}
    schedule: {schedule}
""" + "".join(f"    {key}: {value}\n" for key, value in extra.items()))
    app = create_app({**config, **({"callback_secret": "s" * 32, "callback_allowed_hosts": "hooks.example.com"}
                                   if "callback_url" in extra else {})})
    services = app.extensions["flowgate"]
    services.scheduler.clock = clock
    return app, services


def runs_of(services, target: str = "ticking") -> list[Run]:
    return sorted((run for run in services.store.list(target=target, limit=200)), key=lambda run: run.scheduled_for)


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2025, 5, 1, 9, 59, 30))


def test_a_slot_becomes_one_scheduled_run_recorded_as_such(workdir, app_config, clock):
    app, services = gateway(workdir, app_config, "{cron: '0 * * * *'}", clock,
                            callback_url="https://hooks.example.com/done")
    services.scheduler.run_once()  # first seen at 09:59:30: the slots before are not this schedule's
    assert runs_of(services) == []
    clock.advance(seconds=30.25)
    services.scheduler.run_once()
    [run] = runs_of(services)
    assert (run.source, run.scheduled_for, run.status, run.backend) == ("schedule", at(2025, 5, 1, 10), "queued",
                                                                          "local")
    assert run.fallback_reason == "prefect_not_configured"  # dispatched as a trigger would be, the reason kept
    assert run.schedule == {"cron": "0 * * * *", "timezone": "UTC", "catch_up": "latest", "late_seconds": 0.25}
    assert services.store.get(run.id).callback.url == "https://hooks.example.com/done"
    services.scheduler.run_once()
    assert len(runs_of(services)) == 1
    services.store.dispose()


def test_two_schedulers_on_one_store_make_one_run_per_slot(workdir, app_config, clock):
    _, first = gateway(workdir, app_config, "{interval: 60}", clock)
    _, second = gateway(workdir, app_config, "{interval: 60}", clock)
    for _ in range(5):
        first.scheduler.run_once()
        second.scheduler.run_once()
        for run in first.store.list(target="ticking"):  # ended, so none waits and every slot gets a run
            first.store.cancel(run.id)
        clock.advance(seconds=60)
    slots = [run.scheduled_for for run in runs_of(first)]
    assert len(slots) == len(set(slots)) == 4
    first.store.dispose()
    second.store.dispose()


def test_the_slot_is_a_unique_key_whatever_the_progress_says(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{interval: 60}", clock)
    services.scheduler.run_once()
    clock.advance(seconds=31)
    services.scheduler.run_once()
    [run] = runs_of(services)
    services.store.cancel(run.id)
    # A progress set back (a resume on a host whose clock is behind): the slot is offered again, and refused.
    again = NewRun(kind="connector", target="ticking", params={}, backend="local", concurrency_key="x",
                   source="schedule", scheduled_for=run.scheduled_for, schedule={})
    state = services.store.schedules.get("connector", "ticking")
    assert services.store.create_slot_run(again, state.done_until, skip_if_waiting=True) == (TAKEN, None)
    with pytest.raises(IntegrityError), services.store.db.writer.begin() as connection:
        row = {column.name: getattr(run, column.name) for column in Run.__table__.columns}
        connection.execute(insert(Run.__table__).values({**row, "id": "f" * 32, "status": "queued"}))
    assert len(runs_of(services)) == 1
    services.store.dispose()


def test_a_slot_waits_behind_a_running_run_and_the_next_is_skipped(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{interval: 60}", clock)
    services.scheduler.run_once()
    clock.advance(seconds=31)  # 10:00:01
    services.scheduler.run_once()
    first = services.store.claim_next("test-executor", lease_seconds=600)  # it runs
    assert first.scheduled_for == at(2025, 5, 1, 10)
    clock.advance(seconds=60)
    services.scheduler.run_once()  # 10:01 waits behind it
    clock.advance(seconds=60)
    services.scheduler.run_once()  # 10:02 is skipped: one already waits
    clock.advance(seconds=60)
    services.scheduler.run_once()  # and 10:03
    runs = runs_of(services)
    assert [(run.scheduled_for.minute, run.status) for run in runs] == [(0, "running"), (1, "queued")]
    state = services.store.schedules.get("connector", "ticking")
    assert (state.skipped, state.last_skipped_for) == (2, at(2025, 5, 1, 10, 3))
    services.store.dispose()


def test_catch_up_all_runs_each_kept_slot_one_after_another(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{interval: 60, catch_up: all, max_catch_up: 3}", clock)
    services.scheduler.run_once()  # first seen 09:59:30
    clock.advance(minutes=5, seconds=40)  # 10:05:10: six slots passed while "no gateway ran"
    services.scheduler.run_once()
    services.scheduler.run_once()  # the second kept slot waits behind the first; nothing piles up
    assert [run.scheduled_for.minute for run in runs_of(services)] == [3]
    for expected in ([3, 4], [3, 4, 5]):
        services.store.cancel(runs_of(services)[-1].id)  # the waiting run ends (here: cancelled)
        services.scheduler.run_once()
        assert [run.scheduled_for.minute for run in runs_of(services)] == expected
    assert services.store.schedules.get("connector", "ticking").missed == 3  # 10:00, 10:01, 10:02
    services.store.dispose()


def test_latest_runs_one_late_run_after_a_downtime(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{cron: '*/10 * * * *'}", clock)
    services.scheduler.run_once()
    clock.advance(hours=2)  # 11:59:30
    services.scheduler.run_once()
    [run] = runs_of(services)
    assert run.scheduled_for == at(2025, 5, 1, 11, 50) and run.schedule["late_seconds"] == 570.0
    assert services.store.schedules.get("connector", "ticking").missed == 11
    services.store.dispose()


def test_pause_and_resume_persist_and_the_paused_slots_never_run(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{interval: 60}", clock)
    services.scheduler.run_once()
    services.store.schedules.pause("connector", "ticking", by="ops")
    _, restarted = gateway(workdir, app_config, "{interval: 60}", clock)  # another process, or after a restart
    for _ in range(3):
        clock.advance(seconds=60)
        restarted.scheduler.run_once()
    assert runs_of(restarted) == []
    state = restarted.store.schedules.get("connector", "ticking")
    assert (state.paused, state.paused_by) == (True, "ops")
    restarted.store.schedules.resume("connector", "ticking", clock())  # 10:02:30
    restarted.scheduler.run_once()
    assert runs_of(restarted) == []  # 10:00 to 10:02 passed while paused: not run, not counted missed
    clock.advance(seconds=31)
    restarted.scheduler.run_once()
    assert [run.scheduled_for for run in runs_of(restarted)] == [at(2025, 5, 1, 10, 3)]
    assert restarted.store.schedules.get("connector", "ticking").missed == 0
    services.store.dispose()
    restarted.store.dispose()


@pytest.mark.parametrize("day", [datetime(2025, 3, 30), datetime(2025, 10, 26)], ids=["spring-forward", "fall-back"])
def test_2_am_in_berlin_fires_once_on_a_dst_day_with_the_clock_walking_through_it(workdir, app_config, day):
    berlin = timezone(timedelta(hours=1))  # only to place the clock before the day starts
    clock = Clock(day.replace(tzinfo=berlin) - timedelta(hours=1))
    _, services = gateway(workdir, app_config, "{cron: '0 2 * * *', timezone: Europe/Berlin}", clock)
    for _ in range(6 * 26):  # every 10 minutes through the day
        services.scheduler.run_once()
        for run in services.store.list(target="ticking"):
            services.store.cancel(run.id)
        clock.advance(minutes=10)
    [run] = runs_of(services)
    assert run.scheduled_for.astimezone(berlin).date() == day.date()
    services.store.dispose()


def test_an_inactive_schedule_never_fires(workdir, app_config, clock):
    _, services = gateway(workdir, app_config, "{interval: 60, active: false}", clock)
    for _ in range(3):
        services.scheduler.run_once()
        clock.advance(seconds=60)
    assert runs_of(services) == [] and services.store.schedules.get("connector", "ticking") is None
    services.store.dispose()


def test_a_slot_starts_at_once_while_a_triggered_run_holds_every_slot(workdir, app_config, clock):
    """FLOWGATE_SCHEDULE_SLOTS: the executor's one slot runs a minute-long triggered run; the schedule's slot is
    not held behind it, it runs beside it in the lane kept for scheduled runs."""
    app, services = gateway(workdir, {**app_config, "executor_threads": 1}, "{interval: 60}", clock, also="""
  held:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 5, delay_seconds: 60}}
""")
    client = app.test_client()
    services.executor.start()
    try:
        held = client.post("/trigger", json={"connector_id": "held"}).json["run_id"]
        wait_until(lambda: services.store.get(held).status == "running", 30, "the triggered run holds the slot")
        services.scheduler.run_once()
        clock.advance(seconds=31)
        services.scheduler.run_once()
        [slot] = runs_of(services)
        wait_until(lambda: services.store.get(slot.id).status == "completed", 30, "the slot's run completed")
        assert services.store.get(held).status == "running"
        client.post(f"/api/v1/runs/{held}/cancel")
    finally:
        services.executor.shutdown(timeout=10)
        services.store.dispose()
