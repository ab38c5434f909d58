"""Schedules on real gunicorns: every worker of every gateway runs the scheduler, and each slot still gives one
run; a gateway SIGKILLed mid-way leaves the slots to the survivor, none run twice (uq_runs_slot)."""
from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from itertools import takewhile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.runs.models import Run, ScheduleState
from app.runs.store import RunStore
from connectors.recurrence import recurrence
from flows.outcome import TERMINAL
from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=90)  # started first in the parallel run (conftest.py)


def add_ticker(workdir: Path, seconds: int) -> None:
    with (workdir / "connectors.yaml").open("a") as connectors:
        connectors.write(f"  ticker:\n    source: {{kind: python, ref: \"connectors.demo:numbers\", args: {{n: 1}}}}\n"
                         f"    dataset: ticker\n    schedule: {{interval: {seconds}}}\n")


def add_workflow(workdir: Path, seconds: int) -> None:
    """A workflow of two trivial nodes: it runs in milliseconds, so no slot has to wait behind the one before."""
    (workdir / "workflows").mkdir(exist_ok=True)
    (workdir / "workflows" / "ticker.yaml").write_text(
        f"schedule: {{interval: {seconds}}}\nnodes:\n  - {{id: start, type: trigger}}\n"
        "  - {id: result, type: output, config: {value: tick}}\nconnections:\n  - {from: start, to: result}\n")


def scheduled_runs(store: RunStore) -> list[Run]:
    with store.db.session() as session:
        return list(session.scalars(select(Run).where(Run.target == "ticker", Run.source == "schedule")
                                    .order_by(Run.scheduled_for)))


def slots_per_time(store: RunStore) -> Counter:
    """Runs per slot, counted by the database (the unique key makes every count 1)."""
    with store.db.session() as session:
        return Counter(dict(session.execute(select(Run.scheduled_for, func.count()).where(
            Run.target == "ticker", Run.scheduled_for.is_not(None)).group_by(Run.scheduled_for)).all()))


def test_three_workers_fire_a_2_s_interval_ten_times_in_20_s_none_twice(workdir):
    add_workflow(workdir, 2)
    store = RunStore(f"sqlite:///{(workdir / 'var' / 'flowgate.db').resolve()}")
    server = GunicornServer(workdir, workers=3).start()
    try:
        began = datetime.now(timezone.utc)
        time.sleep(20)  # the window measured: the slots of these 20 s, whichever worker fired each
        ended = datetime.now(timezone.utc)
        in_window = [run for run in scheduled_runs(store) if began < run.scheduled_for <= ended]
        print(f"\n{len(in_window)} scheduled runs in 20 s; fire lag (created - slot): "
              f"{sorted(round((r.created_at - r.scheduled_for).total_seconds(), 3) for r in in_window)}")
        assert 9 <= len(in_window) <= 11, [run.scheduled_for for run in in_window]
        assert set(slots_per_time(store).values()) == {1}
        ids = [run.id for run in in_window]
        wait_until(lambda: all(store.get(run_id).status in TERMINAL for run_id in ids), 120, "the runs ended")
        assert {store.get(run_id).status for run_id in ids} == {"completed"}
        state = store.schedules.get("workflow", "ticker")
        print(f"skipped {state.skipped}, missed {state.missed}")
    finally:
        server.kill()
        store.dispose()


def test_two_gateways_on_postgresql_one_killed_the_survivor_goes_on_and_no_slot_runs_twice(workdir, postgres_url):
    add_ticker(workdir, 1)
    env = {"DATABASE_URL": postgres_url, "FLOWGATE_LEASE_SECONDS": "4"}
    a = GunicornServer(workdir, workers=2, **env).start()
    b = GunicornServer(workdir, workers=2, **env).start()
    store = RunStore(postgres_url)
    try:
        wait_until(lambda: len(scheduled_runs(store)) >= 6, 60, "six slots fired by both gateways")
        os.killpg(a.process.pid, signal.SIGKILL)  # mid-way, whatever it was doing: a pass, a run, a commit
        a.process.wait(10)
        killed_at = datetime.now(timezone.utc)
        wait_until(lambda: any(run.scheduled_for > killed_at + timedelta(seconds=5) for run in scheduled_runs(store)),
                   60, "slots fired by the survivor after the kill")
        time.sleep(3)  # a few more slots, some behind the killed gateway's run until its lease lapses
    finally:
        a.kill()
        b.kill()
    runs = scheduled_runs(store)
    assert set(slots_per_time(store).values()) == {1}
    with store.db.session() as session:
        state = session.get(ScheduleState, ("connector", "ticker"))
    # Every slot from the first run's to the schedule's progress is dealt with exactly once: a run, skipped or missed.
    first, last = runs[0].scheduled_for, state.done_until
    rule = recurrence(interval=1)
    slots = [first, *takewhile(lambda slot: slot <= last, rule.forwards(first))]
    print(f"\n{len(slots)} slots: {len(runs)} runs, {state.skipped} skipped, {state.missed} missed; statuses "
          f"{dict(Counter(run.status for run in runs))}")
    assert len(runs) + state.skipped + state.missed == len(slots)
    assert {run.scheduled_for for run in runs} <= set(slots)
    assert any(run.scheduled_for > killed_at + timedelta(seconds=5) for run in runs)
    store.dispose()
