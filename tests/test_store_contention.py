"""The run store under concurrent gunicorn workers (real processes, loopback only): SQLite's one writer never
surfaces as "database is locked", and one Idempotency-Key makes one run however many callers race with it."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.gunicorn_server import GunicornServer, run_store
from tests.support.waiting import wait_until_ended

pytestmark = pytest.mark.long(seconds=45)  # started first in the parallel run (conftest.py)


def test_a_sqlite_store_under_four_workers_never_surfaces_database_is_locked(workdir):
    server = GunicornServer(workdir, workers=4, FLOWGATE_EXECUTOR_THREADS="4").start()
    try:
        def trigger(i: int) -> httpx.Response:
            return httpx.post(f"{server.url}/trigger", json={"connector_id": ("numbers", "events", "products")[i % 3]},
                              headers={"Connection": "close"}, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(trigger, range(30)))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            ended = Counter(wait_until_ended(client, f"/api/v1/runs/{r.json()['run_id']}", timeout=240)["status"] for r in responses)
        log = server.log()
    finally:
        server.kill()
    assert Counter(r.status_code for r in responses) == {202: 30}
    assert ended == {"completed": 30}
    assert "database is locked" not in log


def test_fifty_concurrent_triggers_with_one_idempotency_key_make_one_run(workdir):
    server = GunicornServer(workdir, workers=3).start()
    try:
        def trigger(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/trigger", json={"connector_id": "numbers"},
                              headers={"Idempotency-Key": "exactly-once", "Connection": "close"}, timeout=30)

        barrier_start = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(trigger, range(50)))
        print(f"\n50 concurrent triggers answered in {time.monotonic() - barrier_start:.2f} s")
    finally:
        server.kill()
    assert {r.status_code for r in responses} <= {200, 202}
    assert len({r.json()["run_id"] for r in responses}) == 1
    store = run_store(workdir)
    assert len(store.list(limit=100)) == 1
    store.dispose()
