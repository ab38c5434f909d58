"""LocalExecutor: claims from the shared store, serialises each connector, records every ending."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from app.backends.executor import LocalExecutor
from app.backends.local import LocalBackend
from app.runs.models import SOURCE_SCHEDULE
from app.runs.store import NewRun, RunStore
from connectors.pipeline import Workspace, concurrency_key
from connectors.registry import ConnectorRegistry
from flows.outcome import COMPLETED, CRASHED, TERMINAL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.long(seconds=40)  # started first in the parallel run (conftest.py)


@pytest.fixture
def parts(workdir: Path, tmp_path: Path):
    registry = ConnectorRegistry.load(workdir / "connectors.yaml")
    workspace = Workspace(workdir / "var" / "dlt", workdir / "var" / "duckdb")
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_schema()
    yield registry, workspace, store
    store.dispose()


def make_executor(parts, slots: int = 2, lease: float = 10.0) -> LocalExecutor:
    registry, workspace, store = parts
    return LocalExecutor(store, registry, workspace, slots=slots, lease_seconds=lease, poll_seconds=0.05)


def enqueue(parts, connector_id: str, params: dict | None = None) -> str:
    registry, workspace, store = parts
    spec = registry.get(connector_id)
    run, _ = store.create_run(NewRun(kind="connector", target=connector_id, params=params or {}, backend="local",
                                     concurrency_key=concurrency_key(spec, workspace)))
    return run.id


def wait_all(store: RunStore, ids: list[str], timeout: float = 60) -> list:
    """The stored runs once every one of them has ended."""
    def ended() -> list | None:
        runs = [store.get(i) for i in ids]
        return runs if all(r.status in TERMINAL for r in runs) else None

    return wait_until(ended, timeout, f"the end of runs {ids}")


def test_runs_of_one_connector_never_overlap_while_others_run_beside_them(parts):
    executor = make_executor(parts, slots=3)
    slow_ids = [enqueue(parts, "slow", {"n": i + 1}) for i in range(3)]
    other = enqueue(parts, "numbers")
    executor.start()
    try:
        runs = wait_all(parts[2], slow_ids + [other])
    finally:
        executor.shutdown(timeout=5)
    assert all(r.status == COMPLETED for r in runs)
    slow = sorted(runs[:3], key=lambda r: r.started_at)
    for earlier, later in zip(slow, slow[1:]):
        assert earlier.finished_at <= later.started_at
    assert runs[3].finished_at < slow[-1].started_at  # `numbers` did not wait behind `slow`


def test_two_executors_share_one_queue_and_each_run_runs_once(parts):
    ids = [enqueue(parts, name) for name in ("numbers", "products", "events", "shop")]
    executors = [make_executor(parts, slots=1), make_executor(parts, slots=1)]
    for executor in executors:
        executor.start()
    try:
        runs = wait_all(parts[2], ids)
    finally:
        for executor in executors:
            executor.shutdown(timeout=5)
    assert [r.status for r in runs] == [COMPLETED] * 4 and all(r.attempts == 1 for r in runs)
    assert {r.lease_owner for r in runs} == {e.id for e in executors}


def test_shutdown_records_a_run_that_could_not_finish(parts):
    executor = make_executor(parts)
    run_id = enqueue(parts, "slow", {"delay_seconds": 5.0})
    executor.start()
    deadline = time.monotonic() + 10
    while parts[2].get(run_id).status != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    # Recorded by shutdown itself, or by the run's own thread once its killed process is gone: either way once.
    assert executor.shutdown(timeout=0.2) in ([], [run_id])
    run = parts[2].get(run_id)
    assert run.status == CRASHED and run.error["code"] == "interrupted"
    assert parts[2].executors.capacity(stale_after_seconds=60).executors == 0


def test_a_heartbeat_under_way_at_shutdown_does_not_write_the_executor_back(parts, monkeypatch):
    """Shutdown removes the executor's row; a heartbeat already past its wait wrote it back after that, and the
    stopped executor counted as alive (capacity, fair claiming) until it aged out."""
    store = parts[2]
    executor = make_executor(parts, lease=0.6)  # a heartbeat every 0.2 s
    real_heartbeat = store.executors.heartbeat
    beating = threading.Event()

    def heartbeat_held_until_shutdown_closes(*args, **kwargs):
        if executor.started:  # not the first one, in start()
            beating.set()
            wait_until(executor._closed.is_set, what="shutdown closed the executor")
        real_heartbeat(*args, **kwargs)

    monkeypatch.setattr(store.executors, "heartbeat", heartbeat_held_until_shutdown_closes)
    executor.start()
    assert beating.wait(30)
    executor.shutdown(timeout=5)
    for thread in executor._threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in executor._threads)
    assert store.executors.capacity(stale_after_seconds=60).executors == 0


def test_a_run_that_ends_as_a_heartbeat_renews_is_not_taken_for_lost(parts, monkeypatch, caplog):
    """Seen under the fuzz test on a busy machine: a heartbeat took its list of running runs, one of them ended and
    was recorded, and the renewal then found it no longer held: "lost the lease", an ERROR, for a run that ended.
    Here a renewal is sent while the run runs and answers only once its end is recorded (a 30 s lease: the fence,
    20 s on, stays out of it)."""
    store = parts[2]
    executor = make_executor(parts, lease=30.0)
    run_id = enqueue(parts, "numbers")
    real_renew = store.renew_leases
    held_back = []

    def renew_after_the_run_ended(owner, run_ids, lease_seconds):
        if run_id in run_ids:  # the snapshot has it: the renewal comes once its end is recorded
            wait_until(lambda: store.get(run_id).status in TERMINAL, what="the run recorded")
            held_back.append(run_id)
        return real_renew(owner, run_ids, lease_seconds)

    monkeypatch.setattr(store, "renew_leases", renew_after_the_run_ended)
    caplog.set_level(logging.ERROR, logger="app.backends.executor")
    executor.start()
    try:
        wait_until(lambda: run_id in executor.leases.held(), what="the run claimed")
        renewal = threading.Thread(target=executor.leases.renew_once)
        renewal.start()
        (run,) = wait_all(store, [run_id])
        renewal.join(60)
        assert held_back == [run_id]
        wait_until(lambda: executor.active == 0, what="the run's thread ended")
    finally:
        executor.shutdown(timeout=5)
    assert run.status == COMPLETED
    assert "lost the lease" not in caplog.text and not executor._lost


def test_a_run_claimed_as_shutdown_begins_is_not_left_running(parts, monkeypatch):
    """Seen under SIGTERM with load: the claim loop's claim was still on its way back from the store when shutdown
    looked at what runs; shutdown found nothing, the process exited, and the run stayed `running` until its lease
    lapsed. Shutdown now waits for the claim in flight, and treats the run it brings like any other."""
    registry, workspace, store = parts
    claiming, shutting_down = threading.Event(), threading.Event()
    real_claim = store.claim_next

    def slow_answer(*args, **kwargs):
        run = real_claim(*args, **kwargs)
        if run is not None:
            claiming.set()
            shutting_down.wait(10)  # the answer arrives after shutdown began
        return run

    monkeypatch.setattr(store, "claim_next", slow_answer)
    executor = make_executor(parts, lease=30.0)
    real_stop_claiming = executor.stop_claiming

    def stop_claiming() -> None:  # the claim's answer is let go as shutdown begins, not after a guessed time
        real_stop_claiming()
        shutting_down.set()

    monkeypatch.setattr(executor, "stop_claiming", stop_claiming)
    run_id = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    assert claiming.wait(30)
    executor.shutdown(timeout=5)
    run = store.get(run_id)
    assert run.status == CRASHED and run.error["code"] == "interrupted", run


def test_a_run_abandoned_by_a_dead_executor_is_recovered_by_a_live_one(parts):
    registry, workspace, store = parts
    run_id = enqueue(parts, "numbers")
    store.claim_next("dead-process", lease_seconds=0.5)  # claimed, then its process "died"
    executor = make_executor(parts, lease=0.6)
    executor.start()
    try:
        (run,) = wait_all(store, [run_id], timeout=10)
    finally:
        executor.shutdown(timeout=5)
    assert run.status == CRASHED and run.error["code"] == "lease_expired" and "dead-process" in run.error["message"]


def test_a_draining_executor_keeps_its_leases_until_its_runs_end(parts):
    """SIGTERM stops claiming at once; a run draining for longer than the lease must not be recovered as crashed."""
    store = parts[2]
    # Leases of 3 s (renewed every second: a starved heartbeat has 2 s of slack), 9 s of extract: three leases.
    draining, other = make_executor(parts, lease=3.0), make_executor(parts, lease=3.0)
    run_id = enqueue(parts, "slow", {"delay_seconds": 9.0})
    draining.start()
    wait_until(lambda: store.get(run_id).status == "running", what="the run started")
    draining.stop_claiming()  # what gunicorn's SIGTERM does first
    other.start()  # another process, recovering lapsed leases on every heartbeat
    try:
        (run,) = wait_all(store, [run_id])
    finally:
        draining.shutdown(timeout=30)
        other.shutdown(timeout=5)
    assert run.status == COMPLETED, run.error
    assert run.lease_owner == draining.id


def recover_as_lapsed(store: RunStore, run_id: str) -> None:
    """Another process recovers the run (crashed): its lease as that process finds it, lapsed.

    The owner's heartbeat may renew the lease between the write that lapses it and the recovery (then nothing is
    recovered: lapse it again), or recover it itself first (then it is recovered all the same)."""
    from app.runs.models import Run

    def recovered() -> bool:
        with store.db.session(write=True) as session:
            session.get(Run, run_id).lease_expires_at = store.get(run_id).started_at
        store.recover_expired()
        return store.get(run_id).status == CRASHED

    wait_until(recovered, what="the run recovered as crashed")


def test_an_executor_that_lost_its_lease_stops_the_run_and_writes_nothing(parts):
    """The database recovered the run elsewhere (it could not be reached for longer than the lease)."""
    registry, workspace, store = parts
    executor = make_executor(parts, lease=1.0)
    run_id = enqueue(parts, "slow", {"delay_seconds": 3.0})
    executor.start()
    try:
        wait_until(lambda: store.get(run_id).status == "running", what="the run started")
        recover_as_lapsed(store, run_id)
        wait_until(lambda: executor.active == 0, what="the executor stopped the run")
    finally:
        executor.shutdown(timeout=10)
    run = store.get(run_id)
    assert run.status == CRASHED and run.error["code"] == "lease_expired" and run.result is None
    location = workspace.duckdb_dir / "slow.duckdb"
    if location.exists():  # stopped at the checkpoint after extract: nothing was loaded
        import duckdb
        with duckdb.connect(str(location), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'numbers'"
                               ).fetchone()[0] == 0


def test_a_run_whose_thread_cannot_start_ends_recorded_and_claiming_goes_on(parts, monkeypatch):
    import app.backends.executor as executor_module

    real_thread = executor_module.threading.Thread
    failures = []

    class FlakyThread(real_thread):
        def start(self):
            if self.name.startswith("flowgate-run-") and not failures:
                failures.append(self.name)
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(executor_module.threading, "Thread", FlakyThread)
    executor = make_executor(parts)
    first, second = enqueue(parts, "numbers"), enqueue(parts, "events")
    executor.start()
    try:
        runs = wait_all(parts[2], [first, second])
    finally:
        executor.shutdown(timeout=5)
    assert [r.status for r in runs] == [CRASHED, COMPLETED]
    assert runs[0].error["code"] == "executor_failed" and "can't start new thread" in runs[0].error["message"]


def test_cancel_stops_a_run_stuck_inside_a_step_within_seconds(parts):
    """A source that never answers: the run is stopped by force, its key freed, and this process carries on."""
    store = parts[2]
    executor = make_executor(parts, lease=2.0)
    stuck = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    try:
        wait_until(lambda: store.get(stuck).status == "running", what="the run started")
        # Cancelled at once: the run reaches its extract (which will not end by itself for an hour) within its
        # grace, since no checkpoint comes before the extract's end.
        store.cancel(stuck)
        (run,) = wait_all(store, [stuck], timeout=60)
        after = enqueue(parts, "slow", {"delay_seconds": 0.0})
        (next_run,) = wait_all(store, [after], timeout=60)
    finally:
        executor.shutdown(timeout=10)
    assert run.status == "cancelled" and run.error["step"] == "extract" and "by force" in run.error["message"]
    assert next_run.status == COMPLETED  # the connector's key was freed, the executor still runs


def test_the_run_timeout_stops_a_run_stuck_inside_a_step(parts):
    registry, workspace, store = parts
    executor = LocalExecutor(store, registry, workspace, slots=1, lease_seconds=20.0, poll_seconds=0.05,
                             run_timeout_seconds=1.0)  # the timeout, not the lease (fenced at 13 s), stops it
    stuck = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    try:
        (run,) = wait_all(store, [stuck], timeout=60)
    finally:
        executor.shutdown(timeout=10)
    assert run.status == "failed" and run.error["code"] == "run_timeout"


def run_process(caplog) -> int:
    """The id of the process a connector run started in (connectors.isolated logs it at INFO)."""
    found = wait_until(lambda: re.search(r"runs in process (\d+)", caplog.text), what="the run's process started")
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_shutdown_stops_a_stuck_runs_process_before_recording_it_interrupted(parts, caplog):
    """A run recorded `crashed` (interrupted) frees its connector's key: its process must be gone by then."""
    caplog.set_level(logging.INFO, logger="connectors.isolated")
    store = parts[2]
    executor = make_executor(parts, lease=2.0)
    stuck = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    pid = run_process(caplog)
    unfinished = executor.shutdown(timeout=8)
    run = store.get(stuck)
    assert run.status == CRASHED and run.error["code"] == "interrupted", run.error
    assert unfinished in ([], [stuck])
    assert not alive(pid), f"the run's process {pid} outlived the record of its interruption"


def test_a_new_run_wakes_the_claim_loop_only_when_a_slot_could_take_its_kind(parts):
    """With its connector slots busy, an executor is not woken to claim for every connector triggered: that claim
    would find nothing it may start. A workflow still wakes it (its slot is free)."""
    registry, workspace, store = parts
    executor = LocalExecutor(store, registry, workspace, slots=2, lease_seconds=10, poll_seconds=3600,
                             reserved_slots=1)
    first = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    try:
        executor.wake("connector")
        wait_until(lambda: store.get(first).status == "running", what="the first run started")
        wait_until(lambda: not executor._wake.is_set(), what="the claim loop waiting again")
        enqueue(parts, "numbers")
        executor.wake("connector")
        assert not executor._wake.is_set()
        assert executor._has_slot_for("workflow")  # its wake() sets the event (the loop may have cleared it since)
    finally:
        executor.shutdown(timeout=8)


def test_a_scheduled_run_wakes_the_claim_loop_when_only_the_schedule_lane_is_free(parts):
    """Every slot busy, the lane free: a new scheduled run is claimed at once, not at the next poll (before, its wake
    was dropped like a trigger's, and a slot waited up to a poll: 0.6 s of fire lag at capacity, bench/schedules.py)."""
    registry, workspace, store = parts
    executor = LocalExecutor(store, registry, workspace, slots=1, lease_seconds=10, poll_seconds=3600,
                             schedule_slots=1)
    busy = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    try:
        executor.wake("connector")
        wait_until(lambda: store.get(busy).status == "running", what="the triggered run holding the only slot")
        wait_until(lambda: not executor._wake.is_set(), what="the claim loop waiting again")
        slot = datetime.now(timezone.utc).replace(microsecond=0)
        run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                         concurrency_key=concurrency_key(registry.get("numbers"), workspace),
                                         source=SOURCE_SCHEDULE, scheduled_for=slot))
        LocalBackend(store, executor).submit(run)
        wait_until(lambda: store.get(run.id).status != "queued", timeout=20, what="the scheduled run claimed")
    finally:
        executor.shutdown(timeout=8)


def test_shutdown_stops_a_workflow_connector_nodes_process_before_recording_it_too(parts, caplog):
    """A workflow's connector node runs its connector in a process of its own too; at shutdown's last second that
    process is killed at once like any run's (it had a cancel's grace of seconds, outliving the record)."""
    caplog.set_level(logging.INFO, logger="connectors.isolated")
    store = parts[2]
    executor = make_executor(parts, slots=4, lease=2.0)
    definition = {"id": "stuck", "nodes": [{"id": "load", "type": "connector",
                             "config": {"connector_id": "slow", "params": {"delay_seconds": 3600.0}}}]}
    run, _ = store.create_run(NewRun(kind="workflow", target="stuck", params={"workflow": definition},
                                     backend="local", concurrency_key="workflow:stuck"))
    executor.start()
    pid = run_process(caplog)
    executor.shutdown(timeout=3)
    ended = store.get(run.id)
    assert ended.status == CRASHED and ended.error["code"] == "interrupted", (ended.status, ended.error)
    assert not alive(pid), f"the node's process {pid} outlived the record of its workflow's interruption"


def test_a_run_whose_lease_was_lost_is_killed_at_once_not_left_to_reach_a_checkpoint(parts, monkeypatch):
    """Another process may start the connector's next run as soon as the lease is gone: a run stuck inside a step
    must not go on beside it for a grace period (here as long as an hour)."""
    from functools import partial

    import app.backends.executor as executor_module

    monkeypatch.setattr(executor_module, "run_connector_isolated",
                        partial(executor_module.run_connector_isolated, grace_seconds=3600))
    registry, workspace, store = parts
    executor = make_executor(parts, lease=1.0)
    stuck = enqueue(parts, "slow", {"delay_seconds": 3600.0})
    executor.start()
    try:
        wait_until(lambda: store.get(stuck).status == "running", what="the run started")
        recover_as_lapsed(store, stuck)
        wait_until(lambda: executor.active == 0, timeout=60, what="the run's process was killed")
    finally:
        executor.shutdown(timeout=10)
    run = store.get(stuck)
    assert run.status == CRASHED and run.error["code"] == "lease_expired"
