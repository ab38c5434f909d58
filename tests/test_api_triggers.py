"""POST /trigger and POST /api/v1/connectors/<id>/runs: accepted at once, tracked in the store, optional wait."""
from __future__ import annotations

from pathlib import Path

import duckdb

from tests.support.waiting import wait_until_ended


def test_a_trigger_answers_202_at_once_with_a_queued_local_run(client):
    response = client.post("/trigger", json={"connector_id": "shop"})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "queued" and body["backend"] == "local" and body["connector_id"] == "shop"
    assert body["fallback_reason"] == "prefect_not_configured"
    assert response.headers["Location"] == body["status_url"] == f"/api/v1/runs/{body['run_id']}"
    assert client.get(body["status_url"]).json["status"] == "queued"  # no executor started in this app


def test_a_triggered_run_completes_with_its_load_summary_and_data(running_app, workdir):
    client = running_app.test_client()
    body = client.post("/trigger", json={"connector_id": "slow"}).json
    assert body["status"] == "queued"  # as accepted; an executor may claim it before the first poll
    done = wait_until_ended(client, body["status_url"])
    assert done["status"] == "completed" and set(done["seen"]) <= {"queued", "running", "completed"}
    result = done["result"]
    assert result["rows"] == {"numbers": 5} and result["dataset"] == "raw" and result["destination"] == "duckdb"
    assert len(result["load_ids"]) == 1 and result["duration_seconds"] >= 1.0
    assert done["started_at"] and done["finished_at"] and done["attempt"] == 1 and len(done["attempts"]) == 1
    assert result["location"] == "var/duckdb/slow.duckdb"  # relative to the project: connectors.yaml's folder
    with duckdb.connect(str(workdir / result["location"]), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.numbers").fetchone()[0] == 5


def test_wait_blocks_until_the_run_ends_and_answers_200(running_app):
    client = running_app.test_client()
    response = client.post("/trigger", json={"connector_id": "shop", "wait": 60})
    assert response.status_code == 200
    assert response.json["status"] == "completed" and response.json["result"]["rows"]["orders"] == 100


def test_wait_that_runs_out_answers_202_with_the_current_state(client):
    response = client.post("/trigger", json={"connector_id": "slow", "wait": 0.2})  # no executor: it stays queued
    assert response.status_code == 202 and response.json["status"] == "queued"


def test_params_reach_the_pipeline(running_app):
    client = running_app.test_client()
    response = client.post("/trigger", json={"connector_id": "numbers", "params": {"n": 3}, "wait": 60})
    assert response.json["params"] == {"n": 3} and response.json["result"]["rows"] == {"numbers": 3}


def test_a_failing_connector_ends_failed_with_the_step_and_cause(running_app):
    client = running_app.test_client()
    done = client.post("/trigger", json={"connector_id": "broken", "wait": 60}).json
    assert done["status"] == "failed" and done["result"] is None
    assert done["error"]["code"] == "connector_failed" and done["error"]["step"] == "extract"
    # a SQLite file that is not there: a retry cannot help, and nothing was created in its place
    assert done["error"]["failure_class"] == "terminal" and done["error"]["terminal"] is True
    assert "missing.db does not exist" in done["error"]["message"]
    assert not (Path(running_app.extensions["flowgate"].settings.connectors_file).parent / "missing.db").exists()
    lines = client.get(f"{done['status_url']}/logs").json["items"]
    errors = [line["message"] for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1 and "in step extract" in errors[0] and "missing.db does not exist" in errors[0], lines


def test_the_versioned_route_starts_the_same_kind_of_run(client):
    response = client.post("/api/v1/connectors/numbers/runs", json={"params": {"n": 2}})
    assert response.status_code == 202 and response.json["connector_id"] == "numbers"
    assert client.post("/api/v1/connectors/numbers/runs").status_code == 202  # the body is optional


def test_an_idempotency_key_makes_a_retry_return_the_same_run(client):
    first = client.post("/trigger", json={"connector_id": "shop"}, headers={"Idempotency-Key": "abc"}).json
    again = client.post("/trigger", json={"connector_id": "shop"}, headers={"Idempotency-Key": "abc"}).json
    assert again["run_id"] == first["run_id"]
    conflict = client.post("/trigger", json={"connector_id": "shop", "params": {"tables": ["orders"]}},
                           headers={"Idempotency-Key": "abc"})
    assert conflict.status_code == 409 and conflict.json["code"] == "idempotency_key_reused"
    assert len(client.get("/api/v1/runs").json["items"]) == 1


def test_backend_local_is_honoured_and_prefect_without_a_server_is_503(client):
    local = client.post("/trigger", json={"connector_id": "shop", "backend": "local"})
    assert local.status_code == 202 and local.json["backend"] == "local" and local.json["fallback_reason"] is None
    forced = client.post("/trigger", json={"connector_id": "shop", "backend": "prefect"})
    assert forced.status_code == 503 and forced.json["code"] == "prefect_unavailable"
    assert len(client.get("/api/v1/runs").json["items"]) == 1


def test_the_gateway_runs_on_a_postgresql_run_store(app_config, postgres_url):
    from app import create_app

    app = create_app({**app_config, "database_url": postgres_url})
    executor = app.extensions["flowgate"].executor
    executor.start()
    try:
        client = app.test_client()
        done = client.post("/trigger", json={"connector_id": "shop", "wait": 60})
        assert done.status_code == 200 and done.json["result"]["rows"] == {"orders": 100, "customers": 20}
        ready = client.get("/api/v1/health/ready").json["checks"]
        assert ready["database"]["dialect"] == "postgresql" and ready["executor"]["capacity"] == 2
        assert [r["run_id"] for r in client.get("/api/v1/runs").json["items"]] == [done.json["run_id"]]
    finally:
        executor.shutdown(timeout=10)
        app.extensions["flowgate"].store.dispose()
