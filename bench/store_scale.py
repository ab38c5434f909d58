"""Benchmark: the run store with 1M historic runs against the same store empty, measured in the same run.

For SQLite (a file) and PostgreSQL (when FLOWGATE_TEST_POSTGRES_URL answers): the latency of a trigger (insert
with idempotency key and queue-limit count), a claim + finish, list pages (all, one target, one status), one
target's last 50 runs as the dashboard's charts read them (GET /api/v1/connectors/<id>/stats), pages by one label and
by two (every run has a `tenant` of 20 and a `batch` of 1,000 consecutive runs) and the
periodic queries (overdue runs, lease recovery, queue depth for metrics, unsent callbacks, a target's last run),
on a store of 1,000 runs (an empty one would return empty pages) and on one with 1M ended runs more (100k of them with a delivered callback, made in SQL); the
ratio is printed per operation. The two stores sit side by side and calls alternate between them, so a shared
machine's load weighs on both alike. Then retention prunes the 50k runs past its cutoff, timed.

    .venv/bin/python -m bench.store_scale [--runs 1000000] [--database sqlite|postgresql|both]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from app.runs.models import utcnow
from app.runs.store import NewRun, RunStore
from flows.outcome import RunError
from tests.support.postgres import POSTGRES_URL, postgres_available

TARGETS = 50
BASELINE_RUNS = 1_000  # the "empty" store: a day's worth, so that every page read is full
# Server-side generation: a million rows without a million round trips. :n rows, ids 0..n-1; run i ended i*2 s
# ago (the last 5% past the 30-day cutoff... placed by `old_from`), every 10th with a delivered callback.
FILL_SQLITE = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < :n)
INSERT INTO runs (id, kind, target, params, status, backend, concurrency_key, cancel_requested, attempts,
                  idempotency_key, request_hash, lease_owner, created_at, started_at, finished_at, result)
SELECT printf(:prefix || '%031x', i), 'connector', 't' || (i % 50), '{}', CASE WHEN i % 7 = 0 THEN 'failed' ELSE 'completed' END,
       'local', 't' || (i % 50), 0, 1, CASE WHEN i % 3 = 0 THEN :prefix || '-key-' || i END, 'x', 'host:1:abc',
       datetime(:now, printf('-%d seconds', CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END)),
       datetime(:now, printf('-%d seconds', CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END)),
       datetime(:now, printf('-%d seconds', CASE WHEN i >= :old_from THEN 2999999 + i ELSE i * 2 - 1 END)),
       '{"rows": {"t": 100}}'
FROM seq
"""
FILL_PG = """
INSERT INTO runs (id, kind, target, params, status, backend, concurrency_key, cancel_requested, attempts,
                  idempotency_key, request_hash, lease_owner, created_at, started_at, finished_at, result)
SELECT CAST(:prefix AS text) || lpad(to_hex(i), 31, '0'), 'connector', 't' || (i % 50), '{}',
       CASE WHEN i % 7 = 0 THEN 'failed' ELSE 'completed' END, 'local', 't' || (i % 50), false, 1,
       CASE WHEN i % 3 = 0 THEN :prefix || '-key-' || i END, 'x', 'host:1:abc',
       CAST(:now AS timestamp) - make_interval(secs => CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END),
       CAST(:now AS timestamp) - make_interval(secs => CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END),
       CAST(:now AS timestamp) - make_interval(secs => CASE WHEN i >= :old_from THEN 2999999 + i ELSE i * 2 - 1 END),
       '{"rows": {"t": 100}}'
FROM generate_series(0, :n - 1) AS i
"""
# Two labels per run, created_at the run's: `tenant` c0..c19 (i % 20), `batch` b<i / 1000> (b0: the newest 1,000).
FILL_LABELS_SQLITE = """
WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < :n)
INSERT INTO run_labels (run_id, key, value, created_at)
SELECT printf(:prefix || '%031x', i), k.key, CASE k.key WHEN 'tenant' THEN 'c' || (i % 20) ELSE 'b' || (i / 1000) END,
       datetime(:now, printf('-%d seconds', CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END))
FROM seq, (SELECT 'tenant' AS key UNION ALL SELECT 'batch') AS k
"""
FILL_LABELS_PG = """
INSERT INTO run_labels (run_id, key, value, created_at)
SELECT CAST(:prefix AS text) || lpad(to_hex(i), 31, '0'), k.key,
       CASE k.key WHEN 'tenant' THEN 'c' || (i % 20) ELSE 'b' || (i / 1000) END,
       CAST(:now AS timestamp) - make_interval(secs => CASE WHEN i >= :old_from THEN 3000000 + i ELSE i * 2 END)
FROM generate_series(0, :n - 1) AS i, (VALUES ('tenant'), ('batch')) AS k(key)
"""
FILL_CALLBACKS = """
INSERT INTO run_callbacks (run_id, url, status, attempts, next_attempt_at)
SELECT id, 'https://example.com/hook', 'delivered', '[]', created_at FROM runs WHERE id LIKE :prefix || '%'
AND substr(id, 32, 1) = '0'
"""


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of `fn` in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def operations(store: RunStore) -> dict[str, Callable[[], object]]:
    """The operations measured, bound to `store`."""
    counter = iter(range(10**9))
    batch = uuid.uuid4().hex[:6]

    def trigger() -> None:
        i = next(counter)
        store.create_run(NewRun(kind="connector", target=f"t{i % TARGETS}", params={"i": i}, backend="local",
                                concurrency_key=f"bench-{batch}-{i}", idempotency_key=f"b-{batch}-{i}",
                                max_queued=100_000))

    def claim_and_finish() -> None:
        run = store.claim_next("bench", 30)
        if run is not None:
            store.finish(run.id, "bench", "completed", result={"rows": {}})

    long_ago = utcnow() - timedelta(days=3650)
    return {
        "trigger (insert, key, queue limit)": trigger,
        "claim + finish": claim_and_finish,
        "list: newest 50": lambda: store.list(limit=50),
        "list: one target, newest 50": lambda: store.list(target="t7", limit=50),
        "list: failed, newest 50": lambda: store.list(status="failed", limit=50),
        "history: one target, newest 50 (stats)": lambda: store.history.recent("connector", "t7", 50),
        "list: one label, newest 50": lambda: store.list(labels=[("tenant", "c3")], limit=50),
        "list: two labels, newest 50": lambda: store.list(labels=[("tenant", "c3"), ("batch", "b0")], limit=50),
        # the same two labels for an old batch (9 days back): the rarer first reads 1,000 index entries; the
        # commoner first reads the tenant's runs back to that batch, 20,000 of them (docs/api.md, Labels)
        "list: old batch label first, tenant": lambda: store.list(labels=[("batch", "b400"), ("tenant", "c3")],
                                                                  limit=50),
        "list: tenant label first, old batch": lambda: store.list(labels=[("tenant", "c3"), ("batch", "b400")],
                                                                  limit=50),
        "queue depth (metrics, readiness)": store.count_by_status,
        "lease recovery": store.recover_expired,
        "overdue Prefect runs": lambda: store.fail_overdue("prefect", long_ago, RunError("bench", "bench")),
        "unfinished Prefect runs (sync)": lambda: store.unfinished("prefect"),
        "due callbacks (claim)": lambda: store.callbacks.claim("bench", 30),
        "retention pass, nothing to prune": lambda: store.retention.prune(utcnow() - timedelta(days=3650)),
    }


def measure(small: RunStore, big: RunStore, repeat: int) -> dict[str, tuple[float, float]]:
    """Each operation's median latency in ms on both stores, calls alternating between them so that the load of
    a shared machine weighs on both alike."""
    results = {}
    small_ops, big_ops = operations(small), operations(big)
    for name in small_ops:
        small_ops[name](), big_ops[name]()  # warm: caches, the pool, the planner
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeat):
            for op, kept in ((small_ops[name], times[0]), (big_ops[name], times[1])):
                started = time.perf_counter()
                op()
                kept.append((time.perf_counter() - started) * 1000)
        results[name] = (statistics.median(times[0]), statistics.median(times[1]))
    return results


def fill(store: RunStore, runs: int, prefix: str) -> tuple[float, int]:
    """Add `runs` ended runs (5% past a 30-day cutoff), their labels and their callbacks; (seconds taken, runs past
    cutoff)."""
    old_from = runs - runs // 20
    started = time.perf_counter()
    with store.db.writer.begin() as connection:
        if not store.is_sqlite:  # one statement of a million rows: the store's per-request timeout is not for it
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        values = {"n": runs, "old_from": old_from, "prefix": prefix, "now": utcnow().replace(tzinfo=None).isoformat(" ")}
        for sql in (FILL_SQLITE, FILL_LABELS_SQLITE) if store.is_sqlite else (FILL_PG, FILL_LABELS_PG):
            connection.execute(sa.text(sql), values)
        connection.execute(sa.text(FILL_CALLBACKS), {"prefix": prefix})
    if store.is_sqlite:  # the fill's WAL is written back now, not by the first measured write
        with store.db.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    else:  # statistics and hint bits as autovacuum leaves them, the load's WAL checkpointed (SQLite keeps no
        # statistics unless someone runs ANALYZE, which flowgate does not)
        with store.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
            connection.exec_driver_sql("CHECKPOINT")
    return time.perf_counter() - started, runs - old_from


def run_one(name: str, small_url: str, big_url: str, runs: int, repeat: int) -> None:
    """Fill a small and a big store on one server, then measure both side by side."""
    small, big = RunStore(small_url), RunStore(big_url)
    try:
        for store in (small, big):
            store.create_schema()
            fill(store, BASELINE_RUNS, "b")  # enough for full pages: the same work per call on both
        seconds, old = fill(big, runs, "h")
        print(f"\n{name}: filled {runs:,} ended runs in {seconds:.1f} s")
        header = f"{'operation':38} {f'{BASELINE_RUNS:,} runs':>12} {f'{runs + BASELINE_RUNS:,} runs':>14} {'ratio':>7}"
        print(header)
        print("-" * len(header))
        for op, (base, full) in measure(small, big, repeat).items():
            print(f"{op:38} {base:10.3f}ms {full:12.3f}ms {full / base:6.2f}x")
        started = time.perf_counter()
        pruned = big.retention.prune(utcnow() - timedelta(days=30), batch_size=500)
        took = time.perf_counter() - started
        print(f"retention: pruned {pruned:,} runs past 30 days in {took:.1f} s "
              f"({pruned / took:,.0f} runs/s, batches of 500)")
    finally:
        small.dispose()
        big.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    if args.database != "postgresql":
        with tempfile.TemporaryDirectory(prefix="flowgate-scale-") as tmp:
            run_one("SQLite", f"sqlite:///{Path(tmp) / 'small.db'}", f"sqlite:///{Path(tmp) / 'big.db'}", args.runs,
                    args.repeat)
    if args.database == "sqlite":
        return
    reason = postgres_available()
    if reason:
        print(f"\nPostgreSQL skipped: {reason}")
        return
    schemas = [f"flowgate_bench_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        for schema in schemas:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        small_url, big_url = (f"{POSTGRES_URL}?options=-csearch_path%3D{schema}" for schema in schemas)
        run_one("PostgreSQL", small_url, big_url, args.runs, args.repeat)
    finally:
        with admin.connect() as connection:
            for schema in schemas:
                connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


if __name__ == "__main__":
    main()
