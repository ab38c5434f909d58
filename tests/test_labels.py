"""Labels and who started a run: bounded labels on triggers and executes, `triggered_by` from the API key, runs
found by label on the same keyset cursor (from the label's index), labels on connector-node runs and Prefect tags."""
from __future__ import annotations

import json

import pytest
import respx
import sqlalchemy as sa

from app import create_app
from app.backends.prefect import PrefectBackend
from app.backends.prefect_client import PrefectClient
from app.backends.prefect_route import PrefectRoute
from app.runs.store import NewRun, RunStore

KEY = "labels-trigger-key-0123456789"


def test_labels_and_triggered_by_are_on_the_run(client):
    run = client.post("/trigger", json={"connector_id": "shop", "labels": {"tenant": "acme", "team.data-1": ""}}).json
    assert run["labels"] == {"tenant": "acme", "team.data-1": ""} and run["triggered_by"] == "anonymous"
    assert run["source"] == "api"
    execution = client.post("/api/workflow/fan_out/execute", json={
        "workflow": {"nodes": [{"id": "a", "type": "transform"}]}, "labels": {"tenant": "acme"}}).json
    assert client.get(f"/api/v1/runs/{execution['executionId']}").json["labels"] == {"tenant": "acme"}


@pytest.mark.parametrize("labels, field", [
    ({"Tenant": "acme"}, "labels.Tenant"), ({"1st": "x"}, "labels.1st"), ({"k" * 64: "x"}, f"labels.{'k' * 64}"),
    ({"tenant": "x" * 257}, "labels.tenant"), ({f"k{i}": "x" for i in range(17)}, "labels"),
    ({"tenant": 5}, "labels.tenant")])
def test_a_bad_label_is_a_422_naming_it_and_nothing_is_stored(client, labels, field):
    for path, body in (("/trigger", {"connector_id": "shop"}), ("/api/v1/connectors/shop/runs", {}),
                       ("/api/workflow/fan_out/execute", {})):
        answer = client.post(path, json={**body, "labels": labels})
        assert answer.status_code == 422, answer.json
        assert answer.json["errors"][0]["field"].startswith(field), answer.json
    assert client.get("/api/v1/runs").json["items"] == []


def test_triggered_by_is_the_api_keys_name(app_config):
    app = create_app({**app_config, "api_keys": f"billing-backend:{KEY}:read+trigger"})
    try:
        run = app.test_client().post("/trigger", json={"connector_id": "shop"}, headers={"X-API-Key": KEY}).json
        assert run["triggered_by"] == "billing-backend"
    finally:
        app.extensions["flowgate"].store.dispose()


def test_runs_are_listed_by_label_and_status_a_page_at_a_time(app, client):
    store = app.extensions["flowgate"].store
    acme = [client.post("/trigger", json={"connector_id": "shop", "labels": {"tenant": "acme"}}).json["run_id"]
            for _ in range(3)]
    client.post("/trigger", json={"connector_id": "shop", "labels": {"tenant": "other"}})
    client.post("/trigger", json={"connector_id": "shop"})
    client.post(f"/api/v1/runs/{acme[1]}/cancel")
    seen, cursor = [], None
    while True:
        page = client.get("/api/v1/runs", query_string={"label": "tenant:acme", "limit": 1,
                                                        **({"cursor": cursor} if cursor else {})}).json
        seen += [run["run_id"] for run in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == acme[::-1]
    cancelled = client.get("/api/v1/runs", query_string={"label": "tenant:acme", "status": "cancelled"}).json
    assert [run["run_id"] for run in cancelled["items"]] == [acme[1]]
    assert client.get("/api/v1/runs", query_string={"label": "tenant:nobody"}).json["items"] == []
    bad = client.get("/api/v1/runs", query_string={"label": "Tenant=acme"})
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "label"
    with store.engine.connect() as connection:  # the label's index gives the order: no scan, no sort of runs
        plan = " ".join(str(row) for row in connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT runs.id FROM runs JOIN run_labels ON run_labels.run_id = runs.id "
            "WHERE run_labels.key = 'tenant' AND run_labels.value = 'acme' "
            "ORDER BY run_labels.created_at DESC, run_labels.run_id DESC LIMIT 51"))
    assert "ix_run_labels_key_value_created" in plan and "TEMP B-TREE" not in plan, plan


def test_runs_with_every_label_given_are_listed_a_page_at_a_time(client):
    def trigger(**labels: str) -> str:
        return client.post("/trigger", json={"connector_id": "shop", "labels": labels}).json["run_id"]

    both = [trigger(tenant="acme", batch="7", team="data")]
    trigger(tenant="acme", batch="8")
    trigger(tenant="other", batch="7")
    both.append(trigger(tenant="acme", batch="7"))
    trigger(tenant="acme")
    both.append(trigger(batch="7", tenant="acme"))
    client.post(f"/api/v1/runs/{both[0]}/cancel")
    seen, cursor = [], None
    while True:
        page = client.get("/api/v1/runs", query_string=[("label", "tenant:acme"), ("label", "batch:7"), ("limit", 1),
                                                         *([("cursor", cursor)] if cursor else [])])
        assert page.status_code == 200, page.json
        seen += [run["run_id"] for run in page.json["items"]]
        if not (cursor := page.json["next_cursor"]):
            break
    assert seen == both[::-1]
    three = [("label", "batch:7"), ("label", "team:data"), ("label", "tenant:acme"), ("status", "cancelled")]
    assert [run["run_id"] for run in client.get("/api/v1/runs", query_string=three).json["items"]] == [both[0]]
    none = [("label", "tenant:acme"), ("label", "tenant:other")]  # one key, one value per run: no run has both
    assert client.get("/api/v1/runs", query_string=none).json["items"] == []
    bad = client.get("/api/v1/runs", query_string=[("label", "tenant:acme"), ("label", "Batch=7")])
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "label", bad.json
    many = client.get("/api/v1/runs", query_string=[("label", f"k{i}:v") for i in range(17)])
    assert many.status_code == 422 and many.json["errors"][0]["field"] == "label", many.json
    assert client.get("/api/v1/runs", query_string=[("status", "failed"), ("status", "queued")]).status_code == 422


def test_a_bulk_rerun_takes_the_runs_with_every_label_given(client):
    acme_7, acme_8 = (client.post("/trigger", json={"connector_id": "shop", "labels": {"tenant": "acme", "batch": b}})
                      .json["run_id"] for b in ("7", "8"))
    for run_id in (acme_7, acme_8):
        client.post(f"/api/v1/runs/{run_id}/cancel")

    def matched(label) -> list[str]:
        answer = client.post("/api/v1/runs/rerun", json={"filter": {"status": "cancelled", "label": label},
                                                         "dry_run": True})
        assert answer.status_code == 200, answer.json
        return [item["run_id"] for item in answer.json["items"]]

    assert matched("tenant:acme") == [acme_8, acme_7]
    assert matched(["tenant:acme"]) == [acme_8, acme_7]
    assert matched(["tenant:acme", "batch:7"]) == [acme_7]
    assert matched(["batch:8", "tenant:other"]) == []
    bad = client.post("/api/v1/runs/rerun", json={"filter": {"label": ["tenant:acme", "Batch=7"]}, "dry_run": True})
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "filter.label.1", bad.json


def test_paging_by_label_on_both_databases(store: RunStore):
    ids = [store.create_run(NewRun(kind="connector", target=f"t{i % 2}", params={}, backend="local",
                                   concurrency_key="k", labels={"tenant": "acme" if i != 2 else "other"}))[0].id
           for i in range(5)]
    first = store.list(labels=[("tenant", "acme")], limit=2)
    rest = store.list(labels=[("tenant", "acme")], limit=10, before=(first[-1].created_at, first[-1].id))
    assert [run.id for run in first + rest] == [ids[4], ids[3], ids[1], ids[0]]
    assert [run.id for run in store.list(labels=[("tenant", "acme")], target="t1")] == [ids[3], ids[1]]
    with store.db.session() as session:
        assert session.execute(sa.text("SELECT count(*) FROM run_labels")).scalar() == 5


def test_paging_by_two_labels_on_both_databases(store: RunStore):
    def create(**labels: str) -> str:
        return store.create_run(NewRun(kind="connector", target="t", params={}, backend="local", concurrency_key="k",
                                       labels=labels))[0].id

    both = [create(tenant="acme", batch="7")]
    create(tenant="acme", batch="8"), create(tenant="other", batch="7"), create(tenant="acme")
    both += [create(batch="7", tenant="acme", team="data"), create(tenant="acme", batch="7")]
    wanted = [("tenant", "acme"), ("batch", "7")]
    first = store.list(labels=wanted, limit=2)
    rest = store.list(labels=wanted, limit=10, before=(first[-1].created_at, first[-1].id))
    assert [run.id for run in first + rest] == both[::-1]
    assert [run.id for run in store.list(labels=wanted[::-1])] == both[::-1]  # either label may drive
    assert [run.id for run in store.list(labels=[*wanted, ("team", "data")])] == [both[1]]
    assert store.list(labels=[("tenant", "acme"), ("tenant", "other")]) == []
    if store.is_sqlite:  # the first label's index gives the order, the second is a primary-key lookup: no sort
        with store.engine.connect() as connection:
            plan = " ".join(str(row) for row in connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT runs.id FROM runs JOIN run_labels ON run_labels.run_id = runs.id "
                "WHERE run_labels.key = 'tenant' AND run_labels.value = 'acme' AND EXISTS (SELECT 1 FROM run_labels "
                "AS other WHERE other.run_id = run_labels.run_id AND other.key = 'batch' AND other.value = '7') "
                "ORDER BY run_labels.created_at DESC, run_labels.run_id DESC LIMIT 51"))
        assert "ix_run_labels_key_value_created" in plan and "TEMP B-TREE" not in plan, plan
        assert "sqlite_autoindex_run_labels_1 (run_id=? AND key=?)" in plan, plan


def test_a_workflows_connector_node_runs_with_its_labels_and_caller(running_app):
    client = running_app.test_client()
    done = client.post("/api/workflow/wf/execute", json={
        "workflow": {"nodes": [{"id": "load", "type": "connector", "config": {"connector_id": "numbers"}}]},
        "labels": {"tenant": "acme"}, "wait": 60}).json
    assert done["status"] == "completed"
    runs = client.get("/api/v1/runs", query_string={"label": "tenant:acme"}).json["items"]
    assert [(run["kind"], run["source"], run["labels"]) for run in runs] == [
        ("connector", "workflow", {"tenant": "acme"}), ("workflow", "api", {"tenant": "acme"})]


def test_labels_are_tags_of_the_prefect_flow_run(store: RunStore):
    api = "http://prefect.test/api"
    run, _ = store.create_run(NewRun(kind="connector", target="shop", params={}, backend="prefect",
                                     concurrency_key="k", labels={"tenant": "acme"}))
    route = PrefectRoute(PrefectClient(api, timeout=0.5), "flowgate-connector", "flowgate", reprobe_seconds=60)
    try:
        with respx.mock:
            created = respx.post(f"{api}/deployments/d-1/create_flow_run").respond(
                json={"id": "fr-1", "state": {"type": "SCHEDULED", "name": "Scheduled"}})
            PrefectBackend(store, route, run_timeout_seconds=60).submit(run, "d-1")
        assert "label:tenant=acme" in json.loads(created.calls[0].request.content)["tags"]
    finally:
        route.close()
