"""A trigger drops or rewinds a connector's loaded data (`full_refresh`, an incremental `initial_value`) only where
connectors.yaml allows it (`allow_full_refresh: true`); a run that did records it."""
from __future__ import annotations

import duckdb
import pytest

from app import create_app

INCREMENTAL = """
  orders_only:
    source: {kind: sql_database, url: "sqlite:///shop.db", tables: [orders], incremental: {cursor: id}}
    dataset: kept
  orders_refreshable:
    source: {kind: sql_database, url: "sqlite:///shop.db", tables: [orders], incremental: {cursor: id}}
    dataset: refreshable
    allow_full_refresh: true
"""


@pytest.fixture
def app(workdir, app_config):
    """The test gateway with two incremental connectors more: one that allows a full refresh, one that does not."""
    with open(workdir / "connectors.yaml", "a") as file:
        file.write(INCREMENTAL)
    app = create_app(app_config)
    app.config["TESTING"] = True
    yield app
    app.extensions["flowgate"].store.dispose()


@pytest.mark.parametrize("path,body", [
    ("/trigger", {"connector_id": "orders_only", "params": {"full_refresh": True}}),
    ("/trigger", {"connector_id": "orders_only", "params": {"full_refresh": False}}),
    ("/trigger", {"connector_id": "orders_only", "params": {"initial_value": 1999}}),
    ("/api/v1/connectors/orders_only/runs", {"params": {"full_refresh": True, "initial_value": 1999}}),
    ("/api/v1/connectors/orders_only/preview", {"params": {"initial_value": 1999}}),
    ("/trigger", {"connector_id": "numbers", "params": {"full_refresh": True}}),
])
def test_a_trigger_cannot_drop_or_rewind_the_data_of_a_connector_that_does_not_allow_it(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    field = [error["field"] for error in response.json["errors"]]
    assert field in (["params.full_refresh"], ["params.initial_value"])
    assert "allow_full_refresh" in response.json["errors"][0]["message"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_a_connector_that_does_not_allow_it_neither_lists_nor_documents_the_destructive_params(client):
    assert client.get("/api/v1/connectors/orders_only").json["overridable"] == ["tables"]
    assert client.get("/api/v1/connectors/orders_refreshable").json["overridable"] == \
        ["tables", "initial_value", "full_refresh"]
    variants = {variant["properties"]["connector_id"]["const"]: variant for variant in client.get(
        "/openapi.json").json["components"]["schemas"]["TriggerRequest"]["oneOf"]}
    assert set(variants["orders_only"]["properties"]["params"]["properties"]) == {"tables"}
    assert set(variants["orders_refreshable"]["properties"]["params"]["properties"]) == \
        {"tables", "initial_value", "full_refresh"}


def test_a_full_refresh_the_connector_allows_runs_and_the_run_records_it(running_app, workdir):
    client = running_app.test_client()
    first = client.post("/trigger", json={"connector_id": "orders_refreshable", "wait": 60}).json
    assert first["status"] == "completed" and first["result"]["rows"] == {"orders": 100}
    params = {"full_refresh": True, "initial_value": 99}
    refreshed = client.post("/trigger", json={"connector_id": "orders_refreshable", "params": params, "wait": 60}).json
    assert refreshed["status"] == "completed", refreshed
    assert refreshed["params"] == params and client.get(refreshed["status_url"]).json["params"] == params
    lines = client.get(f"/api/v1/runs/{refreshed['run_id']}/logs").json["items"]
    assert any("full refresh" in line["message"] for line in lines), lines
    with duckdb.connect(str(workdir / refreshed["result"]["location"]), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM refreshable.orders").fetchone()[0] == 2
