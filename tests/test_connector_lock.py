"""One connector runs once at a time whoever runs it: a Prefect flow run's lock and the local executors' claims
(flows/connector_lock.py with app/runs/store.py), on SQLite and PostgreSQL."""
from __future__ import annotations

import logging
import threading

from app.runs.store import NewRun, RunStore
from flows.connector_lock import ConnectorLock, LockLost, run_moved_off_prefect
from flows.database import Database
from flows.outcome import COMPLETED
from tests.support.waiting import wait_until


def _queued(store: RunStore, key: str, target: str = "numbers"):
    run, _ = store.create_run(NewRun(kind="connector", target=target, params={}, backend="local",
                                     concurrency_key=key))
    return run


def test_a_key_a_prefect_flow_run_holds_is_not_claimed_locally_until_released(store: RunStore):
    lock = ConnectorLock(store.db, lease_seconds=30)
    assert lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-1")
    blocked = _queued(store, "duckdb:/x.duckdb")
    other = _queued(store, "duckdb:/y.duckdb", target="events")
    assert store.claim_next("executor", 30).id == other.id  # another connector is free to run
    assert store.claim_next("executor", 30) is None
    inline = NewRun(kind="connector", target="numbers", params={}, backend="local", concurrency_key="duckdb:/x.duckdb")
    assert store.start_inline(inline, "node-runner", 30) is None  # a workflow's connector node waits too
    lock.release("duckdb:/x.duckdb", "prefect:flow-1")
    assert store.claim_next("executor", 30).id == blocked.id


def test_a_key_an_active_local_run_holds_is_not_taken_by_a_flow_run_until_the_run_ends(store: RunStore):
    lock = ConnectorLock(store.db, lease_seconds=30)
    run = _queued(store, "duckdb:/x.duckdb")
    assert store.claim_next("executor", 30).id == run.id
    assert not lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-1")
    assert lock.try_acquire("duckdb:/y.duckdb", "prefect:flow-1")
    store.finish(run.id, "executor", COMPLETED, result={})
    assert lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-1")
    assert not lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-2")  # and no second flow run beside it


def test_a_lapsed_lock_is_taken_over_and_its_old_holder_learns_it_lost_it(store: RunStore):
    short = ConnectorLock(store.db, lease_seconds=0.2)
    assert short.try_acquire("k", "prefect:stalled")  # and then the holder could not renew in time
    wait_until(lambda: short.try_acquire("k", "prefect:next"), what="the lapsed lock taken over")
    assert not short.renew("k", "prefect:stalled")


def test_a_lapsed_lock_cannot_be_renewed_even_while_it_still_names_its_holder(store: RunStore):
    """A local run may be claimed the moment the lock lapses: a late renewal must not bring the lock back beside it."""
    short = ConnectorLock(store.db, lease_seconds=0.2)
    assert short.try_acquire("k", "prefect:stalled")
    run = _queued(store, "k")
    wait_until(lambda: store.claim_next("executor", 600), what="a local run claimed the lapsed key")
    assert not short.renew("k", "prefect:stalled")
    assert store.get(run.id).status == "running"


def test_hold_waits_for_the_local_run_then_keeps_the_key_until_the_block_ends(store: RunStore, monkeypatch):
    lock = ConnectorLock(store.db, lease_seconds=6.0, poll_seconds=0.05)  # renewed every 2 s: 4 s of slack
    refused, renewed = [], []  # what the lock's own calls answered: events to wait for instead of time
    try_acquire, renew = lock.try_acquire, lock.renew

    def counted_acquire(*args) -> bool:
        acquired = try_acquire(*args)
        if not acquired:
            refused.append(args)
        return acquired

    def counted_renew(*args) -> bool:
        renewed.append(renew(*args))
        return renewed[-1]

    monkeypatch.setattr(lock, "try_acquire", counted_acquire)
    monkeypatch.setattr(lock, "renew", counted_renew)
    run = _queued(store, "duckdb:/x.duckdb")
    store.claim_next("executor", 600)
    entered, leave, lost_in_block = threading.Event(), threading.Event(), []

    def flow_run() -> None:
        with lock.hold("duckdb:/x.duckdb", "prefect:flow-1") as lost:
            entered.set()
            leave.wait(60)
            lost_in_block.append(lost.is_set())

    worker = threading.Thread(target=flow_run)
    worker.start()
    wait_until(lambda: len(refused) >= 2, what="the flow run asked twice")
    assert not entered.is_set()  # the local run still holds the key
    store.finish(run.id, "executor", COMPLETED, result={})
    assert entered.wait(60)
    waiting = _queued(store, "duckdb:/x.duckdb")
    wait_until(lambda: len(renewed) >= 3, what="three renewals")  # a lease's worth: the block outlived one
    assert all(renewed) and store.claim_next("executor", 600) is None  # the flow run holds it still
    leave.set()
    worker.join(60)
    assert lost_in_block == [False]
    assert store.claim_next("executor", 600).id == waiting.id  # released at the end of the block


def test_a_flow_run_waiting_behind_a_local_run_is_next_however_many_local_runs_are_queued(store: RunStore):
    """The local executors claim a connector's next run the moment its last one ends; a flow run polling for the
    key would find it taken every time. Waiting reserves the key: the queued local runs come after the flow run."""
    lock = ConnectorLock(store.db, lease_seconds=30)
    running = _queued(store, "duckdb:/x.duckdb")
    store.claim_next("executor", 30)
    assert not lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-1")  # behind the local run
    queued = _queued(store, "duckdb:/x.duckdb")
    store.finish(running.id, "executor", COMPLETED, result={})
    assert store.claim_next("executor", 30) is None  # the flow run is next
    assert lock.try_acquire("duckdb:/x.duckdb", "prefect:flow-1")
    lock.release("duckdb:/x.duckdb", "prefect:flow-1")
    assert store.claim_next("executor", 30).id == queued.id


def test_a_flow_run_that_stops_waiting_gives_its_reservation_back(store: RunStore):
    lock = ConnectorLock(store.db, lease_seconds=30, poll_seconds=0.01)
    running = _queued(store, "duckdb:/x.duckdb")
    store.claim_next("executor", 30)
    attempts = iter(range(3))
    try:
        with lock.hold("duckdb:/x.duckdb", "prefect:flow-1", should_stop=lambda: next(attempts, 3) >= 2):
            raise AssertionError("the key was held by the local run")
    except LockLost:
        pass
    queued = _queued(store, "duckdb:/x.duckdb")
    store.finish(running.id, "executor", COMPLETED, result={})
    assert store.claim_next("executor", 30).id == queued.id


def test_a_flow_run_whose_run_its_run_store_does_not_hold_does_not_execute(store: RunStore, tmp_path, caplog):
    """Fail closed: a worker whose DATABASE_URL is not the gateways' (no runs table there, or not the run), or a
    flow run whose run was pruned, must not execute: its lock would hold against nobody (it was: 'may execute')."""
    on_prefect, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                            concurrency_key="connector:numbers"))
    assert run_moved_off_prefect(store.db, on_prefect.id) is None  # the gateways' store, the run on Prefect
    cancelled, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                           concurrency_key="connector:numbers"))
    store.cancel(cancelled.id)  # a flow run a worker starts after its run was cancelled does not execute either
    assert "it is cancelled on the prefect backend" in run_moved_off_prefect(store.db, cancelled.id)
    own = Database(f"sqlite:///{tmp_path / 'worker-own.db'}")  # a worker left on its default run store
    try:
        with caplog.at_level(logging.ERROR, logger="flows.connector_lock"):
            assert "DATABASE_URL has no runs table" in run_moved_off_prefect(own, on_prefect.id)
        assert "DATABASE_URL has no run unknown-run" in run_moved_off_prefect(store.db, "unknown-run")
    finally:
        own.dispose()
    assert "a worker needs the gateways' DATABASE_URL" in caplog.text
