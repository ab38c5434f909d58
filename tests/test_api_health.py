"""/health (liveness) and /api/v1/health/ready (readiness with reasons)."""
from __future__ import annotations

import time

import pytest


def test_health_answers_without_touching_the_database(app, client, monkeypatch):
    def unreachable(*args, **kwargs):
        raise AssertionError("/health must not use the run store")

    monkeypatch.setattr(app.extensions["flowgate"].store.engine, "connect", unreachable)
    response = client.get("/health")
    assert response.status_code == 200 and response.json["status"] == "healthy"


def test_readiness_reports_database_executor_and_prefect(running_app):
    response = running_app.test_client().get("/api/v1/health/ready")
    assert response.status_code == 200, response.json
    checks = response.json["checks"]
    assert checks["database"]["status"] == "up" and checks["database"]["dialect"] == "sqlite"
    assert checks["executor"] == {**checks["executor"], "status": "up", "executors": 1, "capacity": 2,
                                  "active": 0, "queued": 0}
    assert checks["prefect"]["status"] == "disabled"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
@pytest.mark.parametrize("name", ["prefect-sync", "callbacks", "pruner", "run-logs"])
def test_readiness_names_each_background_loop_that_died(app_config, name):
    from app import create_app

    # Every loop enabled: Prefect configured (nothing listens there), callbacks signed, runs pruned.
    app = create_app({**app_config, "prefect_api_url": "http://127.0.0.1:9/api", "callback_secret": "s" * 32,
                      "retention_days": 7})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        loops = client.get("/api/v1/health/ready").json["checks"]["process"]["loops"]
        assert {loop.name for loop in services.loops if loop.enabled} <= set(loops) and all(loops.values()), loops
        (loop,) = [loop for loop in services.loops if loop.name == name]

        def dies() -> None:  # something no `except Exception` catches: the thread ends
            raise SystemExit(f"{name} died")

        loop.run_once = dies
        loop.wake()
        deadline = time.monotonic() + 10
        while loop.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        response = client.get("/api/v1/health/ready")
        assert response.status_code == 503
        process = response.json["checks"]["process"]
        assert process["loops"][name] is False and name in process["reason"], process
    finally:
        services.stop(timeout=10)
        services.store.dispose()


def test_readiness_is_503_with_a_reason_when_no_executor_runs(client):
    client.post("/trigger", json={"connector_id": "shop"})
    response = client.get("/api/v1/health/ready")
    assert response.status_code == 503 and response.json["status"] == "not_ready"
    executor = response.json["checks"]["executor"]
    assert executor["status"] == "down" and executor["queued"] == 1 and "heartbeat" in executor["reason"]


def test_readiness_is_503_when_the_database_is_unreachable(app, client, monkeypatch):
    def refuse():
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(app.extensions["flowgate"].store, "ping", refuse)
    response = client.get("/api/v1/health/ready")
    assert response.status_code == 503
    assert response.json["checks"]["database"] == {"status": "down",
                                                   "reason": "ConnectionRefusedError: connection refused"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
def test_readiness_shows_a_background_loop_that_stopped(running_app, monkeypatch):
    services = running_app.extensions["flowgate"]
    client = running_app.test_client()
    loops = client.get("/api/v1/health/ready").json["checks"]["process"]["loops"]
    assert loops == {**loops, "claim": True, "heartbeat": True, "run-logs": True}

    def dies(*args, **kwargs):  # something no `except Exception` catches: the thread ends
        raise SystemExit("the claim loop died")

    monkeypatch.setattr(services.store, "claim_next", dies)
    services.executor.wake()
    client.post("/trigger", json={"connector_id": "numbers"})
    deadline = time.monotonic() + 10
    while services.executor.loops()["claim"] and time.monotonic() < deadline:
        time.sleep(0.05)
    response = client.get("/api/v1/health/ready")
    assert response.status_code == 503
    process = response.json["checks"]["process"]
    assert process["status"] == "down" and process["loops"]["claim"] is False and "claim" in process["reason"]


def test_readiness_warns_when_a_flow_run_found_no_run_in_its_workers_run_store(app_config):
    """The gateway holds the run its worker's flow said its run store has not: the workers' DATABASE_URL is not
    the gateway's. Readiness says so (a warning: the gateway itself is ready)."""
    from app import create_app
    from app.runs.store import NewRun

    app = create_app({**app_config, "prefect_api_url": "http://127.0.0.1:9/api"})  # nothing listens there
    services = app.extensions["flowgate"]
    backend = services.dispatcher.prefect
    try:
        client = app.test_client()
        runs = [services.store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                                 concurrency_key="connector:numbers"))[0] for _ in range(2)]
        for run, flow_run_id in zip(runs, ("f-1", "f-2")):
            services.store.record_flow_run(run.id, flow_run_id, "Scheduled")
        backend.apply_flow_run(services.store.get(runs[0].id), {"id": "f-1", "state": {
            "type": "CANCELLED", "name": "Cancelled", "message": "cancelled through the Prefect UI"}})
        assert "warning" not in client.get("/api/v1/health/ready").json["checks"]["prefect"]
        ended = backend.apply_flow_run(services.store.get(runs[1].id), {"id": "f-2", "state": {
            "type": "CANCELLED", "name": "Cancelled", "message": "not executed: the run store at this worker's "
            "DATABASE_URL has no runs table: it is not the gateways' run store"}})
        assert ended.status == "failed" and ended.error["code"] == "worker_run_store_mismatch"  # nobody cancelled it
        prefect = client.get("/api/v1/health/ready").json["checks"]["prefect"]
        assert "DATABASE_URL" in prefect["warning"] and runs[1].id in prefect["warning"]
    finally:
        services.store.dispose()
