"""The run store's parts, each on SQLite and PostgreSQL: node states, the node cache, run log lines, callbacks."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from app.runs.models import CALLBACK_DELIVERED, CALLBACK_PENDING
from app.runs.store import NewRun, RunStore
from flows.outcome import COMPLETED, RunError


def _run(store: RunStore, target: str = "numbers", callback_url: str | None = None, backend: str = "local"):
    run, _ = store.create_run(NewRun(kind="connector", target=target, params={}, backend=backend,
                                     concurrency_key=f"connector:{target}", callback_url=callback_url))
    return run


def _ended(store: RunStore, callback_url: str):
    run = _run(store, callback_url=callback_url)
    claimed = store.claim_next("executor-1", lease_seconds=30)
    assert claimed.id == run.id and store.finish(run.id, "executor-1", COMPLETED, result={"rows": {}})
    return run


def test_node_states_are_saved_updated_and_read_in_declaration_order(store: RunStore):
    run = _run(store)
    store.nodes.save(run.id, [(1, {"id": "b", "status": "pending"}), (0, {"id": "a", "status": "pending"})])
    store.nodes.save(run.id, [(0, {"id": "a", "status": "completed", "output": 1})])
    assert store.nodes.read(run.id) == [{"id": "a", "status": "completed", "output": 1},
                                        {"id": "b", "status": "pending"}]
    assert store.nodes.read("no-such-run") == []


def test_the_node_cache_keeps_an_output_until_it_expires(store: RunStore):
    assert store.node_cache.get("k") == (False, None)
    store.node_cache.put("k", "http", {"status": 200}, ttl_seconds=60)
    assert store.node_cache.get("k") == (True, {"status": 200})
    store.node_cache.put("k", "http", {"status": 201}, ttl_seconds=60)  # the newer output replaces it
    assert store.node_cache.get("k") == (True, {"status": 201})
    store.node_cache.put("gone", "http", "x", ttl_seconds=-1)  # already expired
    assert store.node_cache.get("gone") == (False, None)


def test_log_lines_page_by_id_cursor(store: RunStore):
    run = _run(store)
    at = datetime.now(timezone.utc)
    store.logs.add([{"run_id": run.id, "at": at, "level": "INFO", "logger": "t", "message": f"line {i}"}
                    for i in range(5)])
    first = store.logs.read(run.id, limit=2)
    assert [line["message"] for line in first] == ["line 0", "line 1"]
    rest = store.logs.read(run.id, after=first[-1]["id"], limit=10)
    assert [line["message"] for line in rest] == ["line 2", "line 3", "line 4"]
    assert store.logs.read(_run(store, "other").id) == []


def test_a_callback_is_claimed_once_and_only_after_its_run_ended(store: RunStore):
    ended = _ended(store, "http://127.0.0.1:9/hook")
    waiting = _run(store, "events", callback_url="http://127.0.0.1:9/hook")
    callback, run = store.callbacks.claim("sender-1", lease_seconds=30)
    assert run.id == ended.id and callback.status == CALLBACK_PENDING
    assert store.callbacks.claim("sender-2", lease_seconds=30) is None  # held by sender-1
    store.callbacks.record_delivery(ended.id, "sender-2", {"status_code": 200}, delivered=True, retry_at=None)
    assert store.get(ended.id).callback.status == CALLBACK_PENDING  # not the holder: ignored
    store.callbacks.record_delivery(ended.id, "sender-1", {"status_code": 200}, delivered=True, retry_at=None)
    assert store.get(ended.id).callback.to_dict()["status"] == CALLBACK_DELIVERED
    assert store.callbacks.claim("sender-1", lease_seconds=30) is None  # the other run has not ended
    assert store.get(waiting.id).callback.status == CALLBACK_PENDING


def test_a_failed_delivery_is_retried_later_then_given_up(store: RunStore):
    ended = _ended(store, "http://127.0.0.1:9/hook")
    store.callbacks.claim("s", lease_seconds=30)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    store.callbacks.record_delivery(ended.id, "s", {"error": "refused"}, delivered=False, retry_at=later)
    assert store.callbacks.claim("s", lease_seconds=30) is None  # not due before `later`
    store.callbacks.record_delivery(ended.id, "s", {"error": "refused"}, delivered=False, retry_at=None)
    assert store.get(ended.id).callback.status == CALLBACK_PENDING  # no claim held: nothing recorded
    callback = store.get(ended.id).callback
    assert len(callback.attempts) == 1


def test_prefect_transitions_change_only_an_unfinished_run_still_on_prefect(store: RunStore):
    run = _run(store, backend="prefect")
    assert store.record_flow_run(run.id, "flow-run-1", "Scheduled").prefect_flow_run_id == "flow-run-1"
    moved = store.fall_back_to_local(run.id, "prefect_not_picked_up", prefect_state="Cancelled")
    assert (moved.backend, moved.fallback_reason, moved.prefect_state) == ("local", "prefect_not_picked_up", "Cancelled")
    # A Prefect answer read before the run went local must not touch it (a local executor may hold it now).
    assert store.record_prefect_state(run.id, "queued", "Reclaimed") is None
    assert store.claim_next("executor", 30).id == run.id
    assert store.record_prefect_state(run.id, "queued", "Pending") is None and store.get(run.id).status == "running"

    other = _run(store, "events", backend="prefect")
    failed = store.fail(other.id, RunError("prefect_create_failed", "boom"))
    assert failed.status == "failed" and failed.error == {"code": "prefect_create_failed", "message": "boom",
                                                          "terminal": True, "failure_class": "terminal"}
    assert store.fall_back_to_local(other.id, "late") is None  # it had ended


def test_the_last_run_that_ended_with_an_error_code_is_found_by_its_code(store: RunStore):
    since = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(minutes=1)
    assert store.last_ended_with("worker_run_store_mismatch", since) is None
    other, mismatch = _run(store, backend="prefect"), _run(store, "events", backend="prefect")
    store.fail(other.id, RunError("prefect_failed", "boom"))
    store.fail(mismatch.id, RunError("worker_run_store_mismatch", "no runs table"))
    assert store.last_ended_with("worker_run_store_mismatch", since).id == mismatch.id
    assert store.last_ended_with("worker_run_store_mismatch", since + timedelta(hours=1)) is None


def test_a_targets_recent_runs_come_oldest_first_with_durations_rows_and_backends(store: RunStore):
    from tests.support.run_history import PastRun, add_past_runs

    add_past_runs(store, "shop", [PastRun(5, rows={"orders": 100}), PastRun(7, "failed", "prefect"),
                                  PastRun(3, rows={"orders": 2, "customers": 1})])
    add_past_runs(store, "shop", [PastRun(99)], kind="workflow")  # a workflow of the same name is not its history
    add_past_runs(store, "other", [PastRun(1)])
    points = store.history.recent("connector", "shop", limit=50)
    assert [(p.status, p.backend, p.duration_seconds, p.rows) for p in points] == [
        ("completed", "local", 5.0, {"orders": 100}), ("failed", "prefect", 7.0, {}),
        ("completed", "local", 3.0, {"orders": 2, "customers": 1})]
    assert all(p.fire_lag_seconds is None for p in points)  # none came from a schedule
    assert [p.duration_seconds for p in store.history.recent("connector", "shop", limit=2)] == [7.0, 3.0]
    assert store.history.recent("connector", "nobody", limit=50) == []
    add_past_runs(store, "nightly", [PastRun(2, late=2.5)])  # a schedule's run: started 2.5 s after its slot
    [scheduled] = store.history.recent("connector", "nightly", limit=50)
    assert scheduled.fire_lag_seconds == 2.5 and scheduled.scheduled_for is not None


def test_a_targets_recent_runs_are_one_backward_range_of_an_index(tmp_path):
    """On SQLite the plan reads ix_runs_target_created backwards and sorts nothing, whatever the table holds."""
    from sqlalchemy.dialects import sqlite

    from app.runs.history import recent_query

    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_schema()
    query = recent_query("connector", "t", 50)
    sql = str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as connection:
        plan = " | ".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    store.dispose()
    assert "USING INDEX ix_runs_target_created" in plan and "TEMP B-TREE" not in plan, plan
