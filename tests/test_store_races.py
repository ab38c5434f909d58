"""RunStore transitions that race: one call is held between its read and its write while another runs to its end.

On PostgreSQL (READ COMMITTED) the held call's write then meets a row another transaction changed since the read;
every transition must see that change, not write the row back as it read it. On SQLite the held call holds the
write lock (BEGIN IMMEDIATE) and its process's write turn, so the other waits for it: the same tests show the store's
answers agree with its rows there too. The interleavings are the review's (shared/reviews/exactly-once-2026-12.md, finding 1).
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.runs.models import Run, RunCallback, utcnow
from app.runs.store import NewRun, RunStore
from flows.outcome import CANCELLED, CANCELLING, COMPLETED, CRASHED, FAILED, QUEUED, RUNNING, RunError
from flows.run_lease import RunLease, holder_of
from tests.support.races import race


def queued(store: RunStore, key: str = "duckdb:/shop.duckdb", backend: str = "local") -> Run:
    run, _ = store.create_run(NewRun(kind="connector", target="shop", params={}, backend=backend, concurrency_key=key))
    return run


def claimed(store: RunStore, owner: str = "executor-a") -> Run:
    run = queued(store)
    assert store.claim_next(owner, lease_seconds=600).id == run.id
    return run


def lapse_lease(store: RunStore, run_id: str) -> None:
    """The run's executor stopped renewing a while ago (its process died, or it is late)."""
    with store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == run_id).values(lease_expires_at=utcnow() - timedelta(minutes=5)))


def next_run_of_the_key_is_claimable(store: RunStore) -> bool:
    nxt = queued(store)
    taken = store.claim_next("executor-b", lease_seconds=600)
    return taken is not None and taken.id == nxt.id


def assert_not_active_without_a_lease(run: Run) -> None:
    """Nothing recovers an active local run without a lease: it would hold its connector's key for good."""
    if run.backend == "local" and run.status in (RUNNING, CANCELLING):
        assert run.lease_expires_at is not None, f"{run.status} local run without a lease"


def test_a_cancel_that_read_the_run_running_does_not_reopen_it_once_its_owner_finished_it(store: RunStore):
    run = claimed(store)
    outcome = race(store, held=lambda: store.cancel(run.id),
                   other=lambda: store.finish(run.id, "executor-a", COMPLETED, result={"rows": {"t": 1}}))
    assert outcome.other == COMPLETED
    after = store.get(run.id)
    assert (after.status, after.lease_expires_at, after.result) == (COMPLETED, None, {"rows": {"t": 1}})
    assert outcome.held.status == (COMPLETED if outcome.other_ended_first else CANCELLING)
    assert next_run_of_the_key_is_claimable(store)


def test_a_cancel_that_read_the_run_running_does_not_reopen_it_once_recovery_crashed_it(store: RunStore):
    run = claimed(store)
    lapse_lease(store, run.id)
    outcome = race(store, held=lambda: store.cancel(run.id), other=store.recover_expired)
    assert outcome.other == [run.id]
    after = store.get(run.id)
    assert (after.status, after.lease_expires_at, after.error["code"]) == (CRASHED, None, "lease_expired")
    assert outcome.held.status == (CRASHED if outcome.other_ended_first else CANCELLING)
    assert next_run_of_the_key_is_claimable(store)


def test_a_claim_that_read_the_run_queued_does_not_start_it_once_it_was_cancelled(store: RunStore):
    run = queued(store)
    outcome = race(store, held=lambda: store.claim_next("executor-a", lease_seconds=600),
                   other=lambda: store.cancel(run.id))
    after = store.get(run.id)
    if outcome.other_ended_first:  # the caller was told "cancelled": the run must not execute
        assert outcome.other.status == CANCELLED
        assert outcome.held is None and after.status == CANCELLED and after.lease_owner is None
    else:  # claimed first: the cancel asks the executor to stop it
        assert outcome.held.id == run.id
        assert outcome.other.status == CANCELLING and after.status == CANCELLING and after.cancel_requested


def test_recovery_that_read_a_lapsed_lease_does_not_crash_a_run_its_owner_finished_meanwhile(store: RunStore):
    run = claimed(store)
    lapse_lease(store, run.id)
    outcome = race(store, held=store.recover_expired,
                   other=lambda: store.finish(run.id, "executor-a", COMPLETED, result={"rows": {"t": 1}}))
    after = store.get(run.id)
    # The owner is told whether its end was recorded; what it was told is what the run says.
    if outcome.other:
        assert outcome.held == [] and after.status == COMPLETED and after.error is None
    else:
        assert outcome.held == [run.id] and after.status == CRASHED
    assert bool(outcome.other) is outcome.other_ended_first


def test_a_cancel_that_read_the_run_queued_stops_it_once_an_executor_claimed_it(store: RunStore):
    run = queued(store)
    outcome = race(store, held=lambda: store.cancel(run.id),
                   other=lambda: store.claim_next("executor-a", lease_seconds=600))
    after = store.get(run.id)
    if outcome.other_ended_first:  # executor A runs it: it must stay active (holding its key) and be asked to stop
        assert outcome.other.id == run.id
        assert outcome.held.status == CANCELLING and after.status == CANCELLING and after.cancel_requested
        assert after.lease_owner == "executor-a" and after.lease_expires_at is not None
        assert not next_run_of_the_key_is_claimable(store)
    else:
        assert outcome.other is None and outcome.held.status == CANCELLED and after.status == CANCELLED


def test_the_run_timeout_does_not_fail_a_prefect_run_that_completed_meanwhile(store: RunStore):
    run = queued(store, backend="prefect")
    store.record_prefect_state(run.id, RUNNING, "Running", started_at=utcnow())
    timed_out = RunError.timed_out(60)
    outcome = race(store, held=lambda: store.fail_overdue("prefect", utcnow() + timedelta(minutes=1), timed_out),
                   other=lambda: store.record_prefect_state(run.id, COMPLETED, "Completed", finished_at=utcnow(),
                                                            result={"rows": {"t": 1}}))
    after = store.get(run.id)
    if outcome.other is not None:  # its completion was recorded: the timeout must not overwrite it
        assert outcome.held == [] and (after.status, after.result, after.error) == (COMPLETED, {"rows": {"t": 1}}, None)
    else:
        assert [r.id for r in outcome.held] == [run.id] and after.status == FAILED and after.result is None
    assert (outcome.other is not None) is outcome.other_ended_first


def test_a_prefect_state_read_before_the_run_went_local_does_not_mark_the_local_run_running(store: RunStore):
    run = queued(store, backend="prefect")
    outcome = race(store, held=lambda: store.record_prefect_state(run.id, RUNNING, "Running", started_at=utcnow()),
                   other=lambda: store.fall_back_to_local(run.id, "prefect_not_picked_up", prefect_state="Cancelled"))
    after = store.get(run.id)
    assert_not_active_without_a_lease(after)
    if outcome.other_ended_first:  # local now: a local executor claims it; Prefect's late answer is dropped
        assert outcome.held is None and (after.backend, after.status) == ("local", QUEUED)
        assert store.claim_next("executor-a", lease_seconds=600).id == run.id
    else:  # a worker had it running: it stays on Prefect
        assert outcome.other is None and (after.backend, after.status) == ("prefect", RUNNING)


def test_a_prefect_state_read_before_the_run_ended_does_not_reopen_it(store: RunStore):
    run = queued(store, backend="prefect")
    outcome = race(store, held=lambda: store.record_prefect_state(run.id, RUNNING, "Running", started_at=utcnow()),
                   other=lambda: store.fail(run.id, RunError("prefect_create_failed", "boom")))
    after = store.get(run.id)
    assert after.status == FAILED and after.error["code"] == "prefect_create_failed"
    assert (outcome.held is None) is outcome.other_ended_first


def test_recovery_ends_an_active_local_run_left_without_a_lease(store: RunStore):
    """What the lost updates above left behind before they were fixed: a `cancelling` row with no lease, which
    held its connector's key for good. Recovery heals such rows, so none can wedge a connector."""
    run = claimed(store)
    with store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == run.id).values(status=CANCELLING, cancel_requested=True,
                                                                   lease_expires_at=None, finished_at=utcnow()))
    assert store.recover_expired() == [run.id]
    after = store.get(run.id)
    assert (after.status, after.error["code"]) == (CRASHED, "lease_expired")
    assert "without a lease" in after.error["message"]
    assert next_run_of_the_key_is_claimable(store)


def test_a_sender_whose_claim_lapsed_does_not_erase_the_claim_another_sender_took(store: RunStore):
    """A slow sender records its attempt after its claim lapsed and another sender claimed the delivery: the record
    must not clear the other's claim (a third sender would then send it beside the second)."""
    run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                     concurrency_key="k", callback_url="http://127.0.0.1:9/hook"))
    store.claim_next("executor-a", lease_seconds=600)
    store.finish(run.id, "executor-a", COMPLETED, result={})
    assert store.callbacks.claim("sender-a", lease_seconds=600) is not None
    with store.db.session(write=True) as session:  # sender A's claim lapsed while it was sending
        session.execute(update(RunCallback).where(RunCallback.run_id == run.id)
                        .values(claimed_until=utcnow() - timedelta(seconds=1)))
    outcome = race(store, held=lambda: store.callbacks.record_delivery(
                       run.id, "sender-a", {"attempt": 1, "error": "ReadTimeout"}, False,
                       utcnow() + timedelta(minutes=5)),
                   other=lambda: store.callbacks.claim("sender-b", lease_seconds=600), table="run_callbacks")
    callback = store.get(run.id).callback
    if outcome.other is not None:  # B claimed it: the claim is B's until B records its own attempt
        assert callback.claimed_by == "sender-b", (callback.claimed_by, callback.attempts)
    else:
        assert callback.claimed_by is None and len(callback.attempts) == 1


def test_the_race_harness_lets_the_other_call_end_between_the_held_calls_read_and_write(store: RunStore):
    """The tests above prove something only if the interleaving happens: on PostgreSQL the other call ends while
    the held one waits to write; on SQLite it waits for the held call's write lock."""
    run = claimed(store)
    outcome = race(store, held=lambda: store.cancel(run.id),
                   other=lambda: store.renew_leases("executor-a", [run.id], 600))
    assert outcome.other_ended_first is (not store.is_sqlite)
    assert outcome.held.status == CANCELLING and outcome.other[1] == ({run.id} if store.is_sqlite else set())


@pytest.mark.parametrize("held", ["the flow run's take", "the gateway's take-back"])
def test_a_flow_run_taking_its_run_and_the_gateway_taking_it_back_never_both_win(store: RunStore, held: str):
    """A worker's flow run starts just as the gateway takes its unstarted run back to run it locally: whichever
    compare-and-set on the run commits first wins, and the other changes nothing (Prefect accepts RUNNING over the
    gateway's CANCELLED, so the run store is the only fence)."""
    run = queued(store, backend="prefect")
    lease = RunLease(store.db, run.id, holder_of("flow-run-1", "a"))
    take, take_back = lease.take, lambda: store.fall_back_to_local(run.id, "prefect_not_started",
                                                                   prefect_state="Cancelled")
    outcome = race(store, *((take, take_back) if held == "the flow run's take" else (take_back, take)))
    took, moved = (outcome.held, outcome.other) if held == "the flow run's take" else (outcome.other, outcome.held)
    after = store.get(run.id)
    assert (took is None) != (moved is not None), (took, moved)  # exactly one of them won
    if took is None:  # the flow run executes it; the gateway left it on Prefect
        assert (after.backend, after.lease_owner, after.fallback_reason) == ("prefect", "prefect:flow-run-1:a", None)
    else:  # it runs locally; the flow run ends Cancelled without executing, saying why
        assert (after.backend, after.lease_owner, after.status) == ("local", None, QUEUED)
        assert "local backend" in took
        assert store.claim_next("executor-a", lease_seconds=600).id == run.id


def test_a_flow_run_whose_lease_lapsed_is_ended_and_one_renewing_it_is_not(store: RunStore):
    """The gateway ends a Prefect run whose flow run's process is gone by its lease on the run: never while the
    lease is live (the process renews it), and a lapsed lease cannot be renewed back (it is nobody's)."""
    run = queued(store, backend="prefect")
    lease = RunLease(store.db, run.id, holder_of("flow-run-1", "a"), lease_seconds=600)
    assert lease.take() is None and lease.renew()
    gone = RunError("prefect_crashed", "the flow run's process is gone", failure_class="crashed")
    assert store.end_lapsed_flow_run(run.id, "prefect:flow-run-1:a", gone) is None  # alive: untouched
    assert store.get(run.id).status == QUEUED
    lapse_lease(store, run.id)
    assert not lease.renew()
    assert store.end_lapsed_flow_run(run.id, "prefect:flow-run-2:a", gone) is None  # another flow run's: not ours
    ended = store.end_lapsed_flow_run(run.id, "prefect:flow-run-1:a", gone)
    assert (ended.status, ended.error["code"], ended.prefect_state) == (CRASHED, "prefect_crashed", "Crashed")
