"""GET /api/v1/connectors and /api/v1/connectors/<id>: redacted specs and latest runs."""
from __future__ import annotations

import re


def test_connectors_are_listed_in_file_order(client):
    items = client.get("/api/v1/connectors").json["items"]
    assert [c["id"] for c in items] == ["shop", "products", "events", "numbers", "slow", "broken"]
    shop = items[0]
    assert shop["source_kind"] == "sql_database" and shop["destination_kind"] == "duckdb"
    assert shop["overridable"] == ["tables"] and shop["write_disposition"] == "replace"


def test_a_connector_shows_its_spec_and_latest_runs(client):
    run_id = client.post("/trigger", json={"connector_id": "numbers"}).json["run_id"]
    body = client.get("/api/v1/connectors/numbers").json
    assert body["spec"]["source"] == {"kind": "python", "ref": "connectors.demo:numbers",
                                      "args": {"n": 10, "delay_seconds": 0}}
    assert [r["run_id"] for r in body["latest_runs"]] == [run_id]


def test_connector_secrets_never_reach_a_response(tmp_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv("WAREHOUSE_PASSWORD", "pa55word-xyz")
    (tmp_path / "c.yaml").write_text(
        "connectors:\n  dwh:\n    source: {kind: sql_database, "
        "url: 'postgresql+psycopg://loader:${WAREHOUSE_PASSWORD}@dwh:5432/x', tables: [t]}\n")
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": tmp_path / "c.yaml",
                      "workflows_dir": tmp_path / "workflows"})
    client = app.test_client()
    for path in ("/api/v1/connectors", "/api/v1/connectors/dwh", "/openapi.json"):
        assert "pa55word-xyz" not in client.get(path).get_data(as_text=True)
    assert client.get("/api/v1/connectors/dwh").json["spec"]["source"]["url"].startswith("postgresql+psycopg://loader:***@")


def test_an_unknown_connector_is_a_404_problem(client):
    response = client.get("/api/v1/connectors/nope")
    assert response.status_code == 404 and response.json["code"] == "connector_not_found"


def test_preview_samples_rows_without_loading_or_recording_anything(app, client):
    response = client.post("/api/v1/connectors/shop/preview", json={"limit": 3})
    assert response.status_code == 200
    orders = response.json["resources"]["orders"]
    assert len(orders["rows"]) == 3 and orders["columns"]["id"] == "int64"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", orders["rows"][0]["ordered_on"])  # dates as ISO 8601
    assert set(response.json["resources"]) == {"orders", "customers"}
    csv = client.post("/api/v1/connectors/products/preview", json={}).json["resources"]["products"]
    assert [r["name"] for r in csv["rows"]] == ["Apple", "Bread", "Cheese"]
    assert client.get("/api/v1/runs").json["items"] == []
    var = app.extensions["flowgate"].settings.var_dir
    assert not (var / "duckdb").exists() and not (var / "dlt").exists()


def test_preview_honours_params_and_refuses_bad_input(client):
    sample = client.post("/api/v1/connectors/numbers/preview", json={"limit": 2, "params": {"n": 1}}).json
    assert sample["resources"]["numbers"]["rows"] == [{"n": 0, "square": 0}]
    for body, field in (({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"rows": 1}, "rows"),
                        ({"params": {"url": "x"}}, "params.url")):
        response = client.post("/api/v1/connectors/numbers/preview", json=body)
        assert response.status_code == 422 and [e["field"] for e in response.json["errors"]] == [field]
    assert client.post("/api/v1/connectors/nope/preview", json={}).status_code == 404


def test_a_failing_source_is_a_problem_naming_the_cause(client):
    response = client.post("/api/v1/connectors/broken/preview", json={})
    assert response.status_code == 422 and response.json["code"] == "preview_failed"
    assert "missing.db does not exist" in response.json["detail"]


def test_schema_shows_the_loaded_tables_and_columns(running_app):
    client = running_app.test_client()
    assert client.get("/api/v1/connectors/shop/schema").json["tables"] == {}  # nothing loaded yet
    assert client.post("/trigger", json={"connector_id": "shop", "wait": 60}).json["status"] == "completed"
    body = client.get("/api/v1/connectors/shop/schema").json
    assert body["source"] == "destination" and body["dataset"] == "shop_raw"
    assert set(body["tables"]) == {"orders", "customers"}
    columns = {c["name"]: c["type"] for c in body["tables"]["orders"]}
    assert columns["id"] == "BIGINT" and columns["status"] == "VARCHAR" and columns["ordered_on"] == "DATE"
    assert client.get("/api/v1/connectors/nope/schema").status_code == 404


def test_schema_is_a_503_destination_busy_while_this_process_writes_the_file_or_it_is_being_created(app, client):
    import duckdb

    path = app.extensions["flowgate"].settings.duckdb_dir / "shop.duckdb"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # created, not yet a database
    response = client.get("/api/v1/connectors/shop/schema")
    assert response.status_code == 503 and response.json["code"] == "destination_busy"
    path.unlink()
    with duckdb.connect(str(path)) as writer:  # a load in this very process holds the file read-write
        writer.execute("CREATE SCHEMA shop_raw")
        response = client.get("/api/v1/connectors/shop/schema")
        assert response.status_code == 503 and response.json["code"] == "destination_busy"
        assert response.headers["Retry-After"] == "5"
    assert client.get("/api/v1/connectors/shop/schema").json["tables"] == {}


def test_preview_of_a_python_source_with_a_huge_count_reads_only_its_first_page(client):
    response = client.post("/api/v1/connectors/numbers/preview", json={"limit": 3, "params": {"n": 10**15}})
    assert response.status_code == 200 and len(response.json["resources"]["numbers"]["rows"]) == 3


def test_no_connector_or_run_answer_names_the_projects_absolute_path(running_app, workdir):
    """Paths show relative to the project (connectors.yaml's folder): the source's file and folder, the DuckDB file
    of a load, the schema's location; nothing a caller reads says where the gateway lives on the server."""
    from tests.support.waiting import wait_until_ended

    client = running_app.test_client()
    done = wait_until_ended(client, client.post("/trigger", json={"connector_id": "shop"}).json["status_url"])
    assert done["status"] == "completed" and done["result"]["location"] == "var/duckdb/shop.duckdb"
    failed = wait_until_ended(client, client.post("/trigger", json={"connector_id": "broken"}).json["status_url"])
    assert failed["status"] == "failed"
    shop = client.get("/api/v1/connectors/shop").json
    assert shop["spec"]["source"]["url"] == "sqlite:///shop.db"
    assert client.get("/api/v1/connectors/products").json["spec"]["source"]["bucket_url"] == "files"
    assert client.get("/api/v1/connectors/shop/schema").json["location"] == "var/duckdb/shop.duckdb"
    answers = [client.get(path) for path in (
        "/api/v1/connectors", *(f"/api/v1/connectors/{c}" for c in ("shop", "products", "events", "numbers", "broken")),
        "/api/v1/connectors/shop/schema", "/api/v1/runs", done["status_url"], failed["status_url"], "/openapi.json")]
    root = str(workdir.resolve())
    assert all(answer.status_code == 200 for answer in answers)
    assert [answer.request.path for answer in answers if root in answer.get_data(as_text=True)] == []


def test_a_path_outside_the_project_shows_only_its_name(tmp_path):
    from connectors.shown_paths import shown_path, shown_spec

    project = tmp_path / "project"
    assert shown_path(str(project / "data" / "shop.db"), project) == "data/shop.db"
    assert shown_path("/srv/elsewhere/shop.db", project) == "…/shop.db"
    assert shown_path(f"sqlite:///{project}/data/shop.db", project) == "sqlite:///data/shop.db"
    assert shown_path("sqlite:///relative.db", project) == "sqlite:///relative.db"
    assert shown_path("s3://bucket/folder", project) == "s3://bucket/folder"
    spec = {"source": {"kind": "filesystem", "bucket_url": "/mnt/share/files"},
            "destination": {"kind": "duckdb", "path": str(project / "out.duckdb")},
            "description": f"reads {project}/files"}
    assert shown_spec(spec, project) == {"source": {"kind": "filesystem", "bucket_url": "…/files"},
                                         "destination": {"kind": "duckdb", "path": "out.duckdb"},
                                         "description": "reads files"}


def test_stats_give_a_connectors_newest_runs_oldest_first_with_counts_and_success_rate(app, client):
    from tests.support.run_history import PastRun, add_past_runs

    store = app.extensions["flowgate"].store
    ids = add_past_runs(store, "shop", [PastRun(10, rows={"orders": 100, "customers": 20}),
                                        PastRun(4, "failed", "prefect"), PastRun(12, "cancelled"),
                                        PastRun(8, rows={"orders": 3}), PastRun(6, rows={"refunds": 1}, late=4)])
    body = client.get("/api/v1/connectors/shop/stats").json
    assert body["window"] == 50 and [r["run_id"] for r in body["runs"]] == ids
    assert [(r["status"], r["backend"], r["duration_seconds"]) for r in body["runs"]] == [
        ("completed", "local", 10.0), ("failed", "prefect", 4.0), ("cancelled", "local", 12.0),
        ("completed", "local", 8.0), ("completed", "local", 6.0)]
    assert body["runs"][0]["rows"] == {"orders": 100, "customers": 20} and body["runs"][1]["rows"] == {}
    assert body["tables"] == ["orders", "customers", "refunds"]
    assert body["counts"] == {"completed": 3, "failed": 1, "cancelled": 1}
    assert body["success_rate"] == 0.75  # the cancelled run counts for neither side
    assert [r["fire_lag_seconds"] for r in body["runs"]] == [None, None, None, None, 4.0]  # the last, scheduled
    assert body["runs"][-1]["scheduled_for"] and body["runs"][0]["scheduled_for"] is None
    last_two = client.get("/api/v1/connectors/shop/stats?window=2").json
    assert [r["run_id"] for r in last_two["runs"]] == ids[-2:] and last_two["success_rate"] == 1.0
    empty = client.get("/api/v1/connectors/numbers/stats").json
    assert empty["runs"] == [] and empty["success_rate"] is None and empty["counts"] == {}


def test_stats_refuse_an_unbounded_window_and_an_unknown_connector(client):
    for window in ("0", "201", "ten", "2.5"):
        refused = client.get(f"/api/v1/connectors/shop/stats?window={window}")
        assert refused.status_code == 422 and refused.json["errors"][0]["field"] == "window", window
    assert client.get("/api/v1/connectors/nope/stats").json["code"] == "connector_not_found"


def test_a_preview_of_non_finite_floats_is_valid_json_with_nulls_for_them(tmp_path):
    """Flask wrote a NaN as `NaN` and an infinity as `Infinity`, which no strict JSON parser (Jackson, the browser's
    JSON.parse) reads: the whole answer was unreadable to a Spring client for one odd value in one row."""
    import json

    from app import create_app

    (tmp_path / "c.yaml").write_text(
        "connectors:\n  sensors:\n    source: {kind: python, ref: 'tests.support.odd_values:readings'}\n")
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": tmp_path / "c.yaml",
                      "workflows_dir": tmp_path / "workflows"})
    response = app.test_client().post("/api/v1/connectors/sensors/preview", json={})
    assert response.status_code == 200, response.get_data(as_text=True)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    body = json.loads(response.get_data(as_text=True), parse_constant=refuse)
    assert [row["value"] for row in body["resources"]["readings"]["rows"]] == [None, None, None, 1.5]
