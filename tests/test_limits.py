"""Limits on what a caller controls: rate per key, params size, queued runs, workflow depth, run time."""
from __future__ import annotations

import os
import uuid
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import update

from app import create_app
from app.config import ConfigError
from app.runs.models import Run, utcnow
from app.runs.store import NewRun
from tests.support.gunicorn_server import GunicornServer
from tests.support.waiting import wait_until_ended

KEY_A, KEY_B = "caller-a-key-0123456789", "caller-b-key-0123456789"
REDIS_URL = os.environ.get("FLOWGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def test_each_key_has_its_own_budget_and_a_429_says_when_to_retry(app_config):
    app = create_app({**app_config, "rate_limit": "3/minute",
                      "api_keys": f"a:{KEY_A}:read+trigger,b:{KEY_B}:read+trigger"})
    client = app.test_client()
    statuses = [client.get("/api/v1/runs", headers={"X-API-Key": KEY_A}).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = client.post("/trigger", json={"connector_id": "numbers"}, headers={"X-API-Key": KEY_A})
    assert limited.status_code == 429 and limited.mimetype == "application/problem+json"
    assert limited.json["code"] == "too_many_requests" and int(limited.headers["Retry-After"]) > 0
    assert client.get("/api/v1/runs", headers={"X-API-Key": KEY_B}).status_code == 200  # b's budget is untouched
    assert client.get("/health").status_code == 200  # never limited
    assert client.get("/api/v1/runs", headers={"X-API-Key": KEY_A}).status_code == 429
    app.extensions["flowgate"].store.dispose()


def test_a_malformed_rate_limit_stops_the_start(app_config):
    with pytest.raises(ConfigError, match="FLOWGATE_RATE_LIMIT"):
        create_app({**app_config, "rate_limit": "lots"})


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")


def test_with_shared_storage_every_gunicorn_worker_counts_against_one_budget(workdir):
    _redis_or_skip()
    # A key of this test's own: its budget is shared by this gateway's workers and by nobody else using the
    # same Redis (another test run on this machine, say).
    name, key = f"limits{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    headers = {"X-API-Key": key}
    # Started once /health answers (exempt from limits): readiness probes would spend the budget under test.
    server = GunicornServer(workdir, workers=3, ready_path="/health", FLOWGATE_API_KEYS=f"{name}:{key}:read",
                            FLOWGATE_RATE_LIMIT="10/minute", FLOWGATE_RATE_LIMIT_STORAGE=REDIS_URL).start()
    try:
        statuses = [httpx.get(f"{server.url}/api/v1/runs", headers={**headers, "Connection": "close"}).status_code
                    for _ in range(14)]
    finally:
        server.kill()
    # 14 requests over 3 processes meet one budget of 10.
    assert statuses.count(429) >= 4 and statuses[:1] == [200], statuses


def test_params_larger_than_the_limit_are_a_422(client):
    big = {"n": 1, "padding": "x" * 20_000}
    response = client.post("/trigger", json={"connector_id": "numbers", "params": big})
    assert response.status_code == 422 and response.json["errors"][0]["field"] == "params"
    inputs = client.post("/api/workflow/x/execute", json={"inputs": big, "workflow": {"nodes": [
        {"id": "a", "type": "trigger"}]}})
    assert inputs.status_code == 422 and inputs.json["errors"][0]["field"] == "inputs"


def test_a_full_queue_answers_429_with_retry_after(app_config):
    app = create_app({**app_config, "max_queued_per_target": 2})  # executor not started: runs stay queued
    client = app.test_client()
    assert [client.post("/trigger", json={"connector_id": "numbers"}).status_code for _ in range(3)] == [202, 202, 429]
    full = client.post("/trigger", json={"connector_id": "numbers"})
    assert full.json["code"] == "queue_full" and full.headers["Retry-After"] == "30"
    assert client.post("/trigger", json={"connector_id": "events"}).status_code == 202  # per target
    app.extensions["flowgate"].store.dispose()


def test_inline_workflows_share_one_queue_limit_whatever_their_ids(app_config):
    # A new inline id per trigger got past FLOWGATE_MAX_QUEUED_PER_TARGET: every inline run counts as one target's.
    app = create_app({**app_config, "max_queued_per_target": 2})  # executor not started: runs stay queued
    client = app.test_client()
    inline = {"nodes": [{"id": "a", "type": "trigger"}]}
    statuses = [client.post(f"/api/workflow/adhoc{i}/execute", json={"workflow": inline}).status_code
                for i in range(4)]
    assert statuses == [202, 202, 429, 429]
    full = client.post("/api/workflow/another/execute", json={"workflow": inline})
    assert full.json["code"] == "queue_full" and "inline workflows" in full.json["detail"]
    assert client.post("/trigger", json={"connector_id": "numbers"}).status_code == 202  # a configured target's own
    assert len(client.get("/api/v1/runs").json["items"]) == 3
    app.extensions["flowgate"].store.dispose()


def test_a_workflow_deeper_than_the_limit_is_refused(client):
    chain = [{"id": f"n{i}", "type": "transform"} for i in range(101)]
    edges = [{"from": f"n{i}", "to": f"n{i + 1}"} for i in range(100)]
    response = client.post("/api/workflow/x/execute", json={"workflow": {"nodes": chain, "connections": edges}})
    assert response.status_code == 422 and "101 layers deep; the limit is 100" in response.json["detail"]


def test_a_local_run_past_the_run_timeout_ends_failed(app_config):
    # The heartbeat (a third of the 10 s lease) finds the run overdue and stops it: a 30 s sleep in its extract
    # outlasts any heartbeat a busy machine delays. A lease of 0.9 s lapsed there before it was renewed (crashed).
    app = create_app({**app_config, "run_timeout_seconds": 0.5})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        run = client.post("/trigger", json={"connector_id": "slow", "params": {"delay_seconds": 30.0}}).json
        done = wait_until_ended(client, run["status_url"], timeout=60)
    finally:
        services.stop(timeout=10)
        services.store.dispose()
    assert done["status"] == "failed" and done["error"]["code"] == "run_timeout", done


def test_a_prefect_run_that_never_ends_is_ended_by_the_run_timeout(app_config):
    """A Prefect that vanished for good: the run was handed over and nobody will ever report its end."""
    app = create_app({**app_config, "run_timeout_seconds": 60})
    services = app.extensions["flowgate"]
    run, _ = services.store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                              concurrency_key="connector:numbers"))
    fresh, _ = services.store.create_run(NewRun(kind="connector", target="events", params={}, backend="prefect",
                                                concurrency_key="connector:events"))
    with services.store.db.session(write=True) as session:  # both were created past the run timeout
        session.execute(update(Run).where(Run.id.in_([run.id, fresh.id]))
                        .values(created_at=utcnow() - timedelta(seconds=120)))
    fresh_again, _ = services.store.create_run(NewRun(kind="connector", target="events", params={},
                                                      backend="prefect", concurrency_key="connector:events"))
    assert sorted(r.id for r in services.prefect_sync.end_overdue_runs()) == sorted([run.id, fresh.id])
    ended = services.store.get(run.id)
    assert ended.status == "failed" and ended.error["code"] == "run_timeout"
    assert services.store.get(fresh_again.id).status == "queued"
    services.store.dispose()


def test_the_prefect_run_timeout_counts_from_the_start_not_the_wait_behind_other_runs(app_config):
    """A backlog of one connector's Prefect runs waits behind its concurrency limit: a run that waited past the
    timeout and then started is not failed as it starts."""
    app = create_app({**app_config, "run_timeout_seconds": 60})
    services = app.extensions["flowgate"]
    waited, _ = services.store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                                 concurrency_key="connector:numbers"))
    with services.store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == waited.id).values(
            created_at=utcnow() - timedelta(seconds=120), started_at=utcnow() - timedelta(seconds=5),
            status="running"))
    assert services.prefect_sync.end_overdue_runs() == []
    assert services.store.get(waited.id).status == "running"
    services.store.dispose()
