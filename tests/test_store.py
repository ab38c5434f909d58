"""RunStore on SQLite and PostgreSQL: creation, idempotency, atomic claims, leases, cancellation."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.runs.models import Run, utcnow
from app.runs.store import IdempotencyConflict, NewRun, RunStore
from flows.outcome import CANCELLED, CANCELLING, COMPLETED, CRASHED, QUEUED, RUNNING
from tests.support.waiting import wait_until


def new_run(target: str = "shop", key: str | None = None, params: dict | None = None, lock: str | None = None) -> NewRun:
    return NewRun(kind="connector", target=target, params=params or {}, backend="local",
                  concurrency_key=lock or f"connector:{target}", idempotency_key=key)


def test_a_created_run_is_queued_and_readable(store: RunStore):
    run, created = store.create_run(new_run(params={"n": 3}))
    assert created
    stored = store.get(run.id)
    assert (stored.status, stored.target, stored.params, stored.backend) == (QUEUED, "shop", {"n": 3}, "local")
    assert stored.created_at.tzinfo is not None


def test_list_is_newest_first_and_pages_with_a_cursor(store: RunStore):
    ids = [store.create_run(new_run(target=f"c{i % 2}"))[0].id for i in range(5)]
    first = store.list(limit=3)
    assert [r.id for r in first] == ids[::-1][:3]
    rest = store.list(limit=3, before=(first[-1].created_at, first[-1].id))
    assert [r.id for r in rest] == ids[::-1][3:]
    assert {r.target for r in store.list(target="c1")} == {"c1"}


def test_the_same_idempotency_key_returns_the_same_run(store: RunStore):
    first, created = store.create_run(new_run(key="k1", params={"n": 1}))
    again, created_again = store.create_run(new_run(key="k1", params={"n": 1}))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create_run(new_run(key="k1", params={"n": 2}))
    assert len(store.list()) == 1


def test_concurrent_claims_take_each_run_exactly_once(store: RunStore):
    for i in range(12):
        store.create_run(new_run(target=f"t{i}"))
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(worker: int) -> None:
        while (run := store.claim_next(f"w{worker}", lease_seconds=30)) is not None:
            with lock:
                claimed.append(run.id)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(claimer, range(6)))
    assert len(claimed) == 12 and len(set(claimed)) == 12
    assert all(r.status == RUNNING for r in store.list())


def test_a_schedules_slot_is_claimed_before_triggers_queued_ahead_of_it(store: RunStore):
    """A slot's time is the promise: at capacity it does not wait behind the backlog of triggers (at most one run
    per schedule waits), then the oldest goes first as before."""
    from dataclasses import replace

    triggered = [store.create_run(new_run(target=f"t{i}"))[0].id for i in range(3)]
    slot, _ = store.create_run(replace(new_run(target="nightly"), source="schedule",
                                       scheduled_for=utcnow().replace(microsecond=0)))
    order = [store.claim_next("w", lease_seconds=30).id for _ in range(4)]
    assert order == [slot.id, *triggered]


def test_runs_with_one_concurrency_key_never_run_at_once(store: RunStore):
    a, _ = store.create_run(new_run(target="a", lock="duckdb:/same.duckdb"))
    b, _ = store.create_run(new_run(target="b", lock="duckdb:/same.duckdb"))
    c, _ = store.create_run(new_run(target="c"))
    first = store.claim_next("w1", 30)
    second = store.claim_next("w2", 30)
    assert (first.id, second.id) == (a.id, c.id)
    assert store.claim_next("w3", 30) is None  # b waits for a
    store.finish(a.id, "w1", COMPLETED, result={"rows": {}})
    assert store.claim_next("w3", 30).id == b.id


def test_the_database_refuses_two_active_runs_under_one_key(store: RunStore):
    a, _ = store.create_run(new_run(target="a", lock="k"))
    b, _ = store.create_run(new_run(target="b", lock="k"))
    store.claim_next("w1", 30)
    with pytest.raises(IntegrityError), Session(store.engine) as session, session.begin():
        session.execute(update(Run).where(Run.id == b.id).values(status=RUNNING))
    assert store.get(b.id).status == QUEUED and store.get(a.id).status == RUNNING


def test_a_lapsed_lease_marks_the_run_crashed_and_its_owner_cannot_finish_it(store: RunStore):
    run, _ = store.create_run(new_run())
    # Leases of minutes: on PostgreSQL a lease counts from the claim transaction's start, which may wait on the
    # claim lock that every process on the database (other test runs too) takes.
    store.claim_next("dead-worker", lease_seconds=600)
    assert store.recover_expired() == []  # a lease that holds is not taken
    store.renew_leases("dead-worker", [run.id], lease_seconds=0.2)  # its last renewal: then the worker dies
    assert wait_until(store.recover_expired) == [run.id]
    crashed = store.get(run.id)
    assert crashed.status == CRASHED and crashed.error["code"] == "lease_expired"
    assert crashed.finished_at is not None
    assert not store.finish(run.id, "dead-worker", COMPLETED)
    assert store.get(run.id).status == CRASHED


def test_renewing_a_lease_moves_its_expiry_forward(store: RunStore):
    run, _ = store.create_run(new_run())
    store.claim_next("w1", lease_seconds=600)
    claimed_until = store.get(run.id).lease_expires_at
    assert store.renew_leases("w1", [run.id], lease_seconds=1200) == ({run.id}, set())
    renewed_until = store.get(run.id).lease_expires_at
    assert renewed_until > claimed_until  # now + 1200 s is later than (an earlier) now + 600 s
    assert store.renew_leases("someone-else", [run.id], lease_seconds=6000) == (set(), set())
    assert store.get(run.id).lease_expires_at == renewed_until  # only the owner renews
    assert store.recover_expired() == [] and store.get(run.id).status == RUNNING


def test_cancel_ends_a_queued_run_and_flags_a_running_one(store: RunStore):
    running, _ = store.create_run(new_run(target="r"))
    store.claim_next("w1", 30)
    queued, _ = store.create_run(new_run(target="q"))
    assert store.cancel(queued.id).status == CANCELLED
    assert store.cancel(running.id).status == CANCELLING
    assert store.renew_leases("w1", [running.id], 30) == ({running.id}, {running.id})
    assert store.claim_next("w2", 30) is None  # a cancelled run is never claimed
    assert store.cancel("no-such-run") is None


def test_capacity_counts_executors_with_a_recent_heartbeat(store: RunStore):
    store.executors.heartbeat("e1", "host", 1, slots=2, busy=1)
    store.executors.heartbeat("e2", "host", 2, slots=3, busy=0)
    capacity = store.executors.capacity(stale_after_seconds=30)
    assert (capacity.executors, capacity.slots, capacity.busy) == (2, 5, 1)
    store.executors.remove("e1")
    assert store.executors.capacity(stale_after_seconds=30).slots == 3
    wait_until(lambda: store.executors.capacity(stale_after_seconds=0.1).executors == 0)  # e2 stopped beating


def test_a_full_queue_refuses_the_next_run_of_that_target_only(store):
    from app.runs.store import QueueFull

    def new(target: str) -> NewRun:
        return NewRun(kind="connector", target=target, params={}, backend="local", concurrency_key=target,
                      max_queued=2)

    store.create_run(new("a"))
    store.create_run(new("a"))
    with pytest.raises(QueueFull):
        store.create_run(new("a"))
    assert store.create_run(new("b"))[1] is True
    claimed = store.claim_next("me", lease_seconds=30)
    assert claimed.target == "a"
    assert store.create_run(new("a"))[1] is True  # one left the queue, one may join


def test_the_queue_limit_is_exact_under_50_concurrent_triggers(store: RunStore):
    from app.runs.store import QueueFull

    url = store.db.url.render_as_string(hide_password=False)
    processes = [RunStore(url) for _ in range(5)]  # five gateways' stores, ten triggering threads each
    barrier = threading.Barrier(50)
    outcomes: list[str] = []

    def trigger(own: RunStore, target: str) -> None:
        barrier.wait()
        try:
            own.create_run(NewRun(kind="connector", target=target, params={}, backend="local", concurrency_key=target,
                                  max_queued=10))
            outcomes.append(f"{target}:accepted")
        except QueueFull:
            outcomes.append(f"{target}:full")

    threads = [threading.Thread(target=trigger, args=(processes[i % 5], "a" if i < 40 else "b")) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for own in processes:
        own.dispose()
    assert sorted(outcomes).count("a:accepted") == 10 and outcomes.count("a:full") == 30
    assert outcomes.count("b:accepted") == 10  # another target's queue is its own
    assert store.count_by_status() == {"queued": 20}


def test_a_claim_that_waited_for_the_claim_lock_gets_a_whole_lease(postgres_url):
    """On PostgreSQL every claim first takes one lock shared by all processes; `now()` is the transaction's start,
    before that wait, so a claim that waited longer than its lease returned a lease already lapsed."""
    import sqlalchemy as sa

    from flows.connector_lock import CLAIM_LOCK_ID

    store = RunStore(postgres_url)
    store.create_schema()
    run, _ = store.create_run(new_run())
    blocker = sa.create_engine(postgres_url)
    try:
        with blocker.connect() as connection, connection.begin():
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": CLAIM_LOCK_ID})
            with ThreadPoolExecutor(1) as pool:
                claim = pool.submit(store.claim_next, "w1", 1.0)
                wait_until(lambda: connection.execute(sa.text(  # the claim is queued behind the lock
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")).scalar_one() > 0,
                           what="the claim waiting for the lock")
                connection.execute(sa.text("SELECT pg_sleep(2)"))  # longer than the claim's lease
                released_at = connection.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
                connection.commit()
                claimed = claim.result(timeout=60)
        assert claimed.id == run.id
        # Its lease runs from the claim, after the lock was let go, not from before the wait (already lapsed then).
        assert claimed.lease_expires_at >= released_at + timedelta(seconds=1.0), (claimed.lease_expires_at, released_at)
    finally:
        blocker.dispose()
        store.dispose()


def test_the_end_of_a_run_is_recorded_though_the_database_dropped_its_connection_twice(postgres_url):
    """A failover or a reset connection as a run ends: its end is written on a later try, not left for the lease
    to lapse (which recorded a completed run as crashed)."""
    import sqlalchemy as sa
    from sqlalchemy import event

    store = RunStore(postgres_url)
    store.create_schema()
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    dropped: list[int] = []

    def drop_the_connection(connection, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("UPDATE runs") and len(dropped) < 2:
            pid = connection.connection.dbapi_connection.info.backend_pid
            with admin.connect() as other:  # waits until that backend is gone
                assert other.execute(sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}).scalar_one()
            dropped.append(pid)

    try:
        run, _ = store.create_run(new_run())
        store.claim_next("w1", lease_seconds=600)
        line = {"run_id": run.id, "at": utcnow(), "level": "INFO", "logger": "test", "message": "loaded"}
        event.listen(store.engine, "before_cursor_execute", drop_the_connection)
        assert store.finish(run.id, "w1", COMPLETED, result={"rows": {"t": 1}}, logs=[line]) == COMPLETED
        event.remove(store.engine, "before_cursor_execute", drop_the_connection)
        ended = store.get(run.id)
        assert len(dropped) == 2
        assert (ended.status, ended.result, ended.lease_expires_at) == (COMPLETED, {"rows": {"t": 1}}, None)
        assert [logged["message"] for logged in store.logs.read(run.id)] == ["loaded"]
    finally:
        store.dispose()
        admin.dispose()


def test_a_run_end_the_database_refuses_is_not_tried_again(store: RunStore):
    from sqlalchemy import event

    run, _ = store.create_run(new_run())
    store.claim_next("w1", lease_seconds=600)
    writes: list[str] = []

    def count(connection, cursor, statement, parameters, context, executemany) -> None:
        if statement.startswith("UPDATE runs"):
            writes.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        with pytest.raises(IntegrityError):  # a log line without its message: the same on every try
            store.finish(run.id, "w1", COMPLETED, logs=[{"run_id": run.id, "at": utcnow(), "level": "INFO",
                                                         "logger": "test", "message": None}])
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(writes) == 1 and store.get(run.id).status == RUNNING
