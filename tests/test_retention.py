"""Retention: ended runs past the cutoff go with their log lines, node states, callbacks and idempotency keys;
nothing else does, and only one process prunes at a time."""
from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select, update

from app.pruner import Pruner
from app.runs.models import Run, RunCallback, RunLabel, RunLog, RunNode, utcnow
from app.runs.store import NewRun, RunStore
from flows.outcome import COMPLETED, FAILED


def make_run(store: RunStore, key: str, ended_days_ago: float | None, status: str = COMPLETED,
             created_days_ago: float = 0) -> str:
    """A run with a callback, a log line and a node; ended `ended_days_ago` (None: still in `status`)."""
    run, _ = store.create_run(NewRun(kind="connector", target="shop", params={}, backend="local",
                                     concurrency_key=f"k-{key}", idempotency_key=key, labels={"key": key},
                                     callback_url="https://example.com/hook"))
    store.logs.add([{"run_id": run.id, "at": utcnow(), "level": "INFO", "logger": "t", "message": "line"}])
    store.nodes.save(run.id, [(0, {"id": "a", "status": "completed"})])
    now = utcnow()
    values = {"status": status, "created_at": now - timedelta(days=created_days_ago)}
    if ended_days_ago is not None:
        values["finished_at"] = now - timedelta(days=ended_days_ago)
    with store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == run.id).values(**values))
    return run.id


def counts(store: RunStore, run_id: str) -> tuple[int, int, int, int, int]:
    """Rows of the run, its callback, log lines, nodes and labels."""
    with store.db.session() as session:
        return tuple(session.scalar(select(func.count()).select_from(table).where(column == run_id))
                     for table, column in ((Run, Run.id), (RunCallback, RunCallback.run_id),
                                           (RunLog, RunLog.run_id), (RunNode, RunNode.run_id),
                                           (RunLabel, RunLabel.run_id)))


def test_pruning_deletes_only_ended_runs_past_the_cutoff_with_everything_they_own(store: RunStore):
    old = [make_run(store, f"old-{i}", ended_days_ago=40 + i, status=(COMPLETED, FAILED)[i % 2]) for i in range(5)]
    recent = make_run(store, "recent", ended_days_ago=29)
    old_queued = make_run(store, "old-queued", ended_days_ago=None, status="queued", created_days_ago=90)
    old_running = make_run(store, "old-running", ended_days_ago=None, status="running", created_days_ago=90)

    assert store.retention.prune(utcnow() - timedelta(days=30), batch_size=2) == 5  # three batches

    for run_id in old:
        assert counts(store, run_id) == (0, 0, 0, 0, 0)
    for run_id in (recent, old_queued, old_running):
        assert counts(store, run_id) == (1, 1, 1, 1, 1)
    # The idempotency key of a pruned run is free again; the kept ones still answer.
    again, created = store.create_run(NewRun(kind="connector", target="shop", params={}, backend="local",
                                             concurrency_key="k", idempotency_key="old-0"))
    assert created and again.id not in old
    kept, created = store.create_run(NewRun(kind="connector", target="shop", params={}, backend="local",
                                            concurrency_key="k", idempotency_key="recent", labels={"key": "recent"},
                                            callback_url="https://example.com/hook"))  # the same request
    assert (kept.id, created) == (recent, False)
    assert store.retention.prune(utcnow() - timedelta(days=30)) == 0


def test_only_one_process_prunes_at_a_time(store: RunStore):
    make_run(store, "old", ended_days_ago=40)
    other = RunStore(store.db.url.render_as_string(hide_password=False))  # another process's store
    try:
        with other.retention.exclusive() as held:
            assert held
            assert store.retention.prune(utcnow() - timedelta(days=30)) is None  # skipped: the other one prunes
        assert store.retention.prune(utcnow() - timedelta(days=30)) == 1
    finally:
        other.dispose()


def test_two_pruners_racing_delete_each_run_once(store: RunStore):
    ids = [make_run(store, f"old-{i}", ended_days_ago=40) for i in range(20)]
    results: list[int | None] = []
    stores = [RunStore(store.db.url.render_as_string(hide_password=False)) for _ in range(2)]
    barrier = threading.Barrier(2)

    def prune(own: RunStore) -> None:
        barrier.wait()
        results.append(own.retention.prune(utcnow() - timedelta(days=30), batch_size=3))

    threads = [threading.Thread(target=prune, args=(own,)) for own in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for own in stores:
        own.dispose()
    assert sum(result or 0 for result in results) == 20
    assert all(counts(store, run_id) == (0, 0, 0, 0, 0) for run_id in ids)


def test_the_pruner_keeps_runs_for_retention_days(store: RunStore):
    old, young = make_run(store, "old", ended_days_ago=8), make_run(store, "young", ended_days_ago=6)
    assert Pruner(store, retention_days=7, interval_seconds=3600).prune_once() == 1
    assert (counts(store, old)[0], counts(store, young)[0]) == (0, 1)


def test_retention_zero_keeps_runs_forever(store: RunStore):
    pruner = Pruner(store, retention_days=0, interval_seconds=1)
    pruner.start()
    assert pruner.alive is None


def test_the_command_line_prunes_the_store_in_database_url(tmp_path, monkeypatch, capsys):
    from app.cli import main

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = RunStore(url)
    store.create_schema()
    make_run(store, "old", ended_days_ago=40)
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("FLOWGATE_RETENTION_DAYS", "30")
    assert main(["store", "prune"]) == 0
    assert capsys.readouterr().out.strip() == "pruned 1 ended run(s) older than 30 days"
    store.dispose()
