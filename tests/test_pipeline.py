"""run_connector: real dlt loads into real DuckDB files, checked by reading the files back."""
from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from connectors.pipeline import ConnectorRunError, RunCancelled, Workspace, concurrency_key, run_connector
from connectors.registry import ConnectorRegistry
from connectors.spec import ParamsError
from tests.support.incremental import events_db, incremental_registry


@pytest.fixture
def registry(workdir: Path) -> ConnectorRegistry:
    return ConnectorRegistry.load(workdir / "connectors.yaml")


@pytest.fixture
def workspace(workdir: Path) -> Workspace:
    return Workspace(pipelines_dir=workdir / "var" / "dlt", duckdb_dir=workdir / "var" / "duckdb")


def count(path: str, table: str) -> int:
    with duckdb.connect(path, read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_sql_database_tables_land_in_the_connectors_own_duckdb_file(registry, workspace):
    summary = run_connector(registry.get("shop"), workspace)
    assert summary.rows == {"orders": 100, "customers": 20}
    assert summary.location == str(workspace.duckdb_dir / "shop.duckdb")
    assert summary.dataset == "shop_raw" and summary.destination == "duckdb" and len(summary.load_ids) == 1
    assert count(summary.location, "shop_raw.orders") == 100
    assert count(summary.location, "shop_raw.customers") == 20
    # replace: a second run leaves the same rows, not twice as many
    run_connector(registry.get("shop"), workspace)
    assert count(summary.location, "shop_raw.orders") == 100


def test_csv_and_jsonl_files_are_loaded(registry, workspace):
    products = run_connector(registry.get("products"), workspace)
    assert products.rows == {"products": 3}
    with duckdb.connect(products.location, read_only=True) as con:
        assert con.execute("SELECT name FROM catalogue.products ORDER BY sku").fetchall() == [
            ("Apple",), ("Bread",), ("Cheese",)]
    events = run_connector(registry.get("events"), workspace)
    assert events.rows == {"events": 4}
    assert count(events.location, "raw.events") == 4


def test_a_python_source_runs_with_its_args_and_params(registry, workspace):
    summary = run_connector(registry.get("numbers").with_params({"n": 25}), workspace)
    assert summary.rows == {"numbers": 25}
    run_connector(registry.get("numbers"), workspace)  # append
    assert count(summary.location, "raw.numbers") == 35


def test_a_stop_request_cancels_at_the_next_checkpoint_before_loading(registry, workspace):
    with pytest.raises(RunCancelled) as info:
        run_connector(registry.get("numbers"), workspace, should_stop=lambda: True)
    assert info.value.step == "extract"
    path = workspace.duckdb_dir / "numbers.duckdb"  # recover looked for state there; nothing was loaded
    if path.exists():
        with duckdb.connect(str(path), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'numbers'"
                               ).fetchone()[0] == 0


def test_a_failing_source_reports_its_step_and_cause(registry, workspace):
    with pytest.raises(ConnectorRunError) as info:
        run_connector(registry.get("broken"), workspace)
    assert info.value.connector_id == "broken" and info.value.step == "extract"
    # its SQLite file is not there: named, terminal, and not created by trying (tests/test_failures.py: the rest)
    assert "missing.db does not exist" in info.value.message and info.value.terminal


def test_each_duckdb_file_is_its_own_concurrency_key(registry, workspace, workdir):
    assert concurrency_key(registry.get("shop"), workspace) != concurrency_key(registry.get("numbers"), workspace)
    shared = ConnectorRegistry.load(_yaml(workdir, "a", "b"))
    assert concurrency_key(shared.get("a"), workspace) == concurrency_key(shared.get("b"), workspace)


def _yaml(workdir: Path, *ids: str) -> Path:
    path = workdir / "shared.yaml"
    body = "".join(f"  {i}:\n    source: {{kind: python, ref: 'connectors.demo:numbers'}}\n"
                   f"    destination: {{kind: duckdb, path: var/one.duckdb}}\n" for i in ids)
    path.write_text("connectors:\n" + body)
    return path


def test_a_filesystem_destination_gets_parquet_files_and_a_schema(workdir, workspace):
    import pyarrow.parquet as pq

    from connectors.schema import destination_schema

    path = workdir / "lake.yaml"
    path.write_text("connectors:\n  lake:\n    source: {kind: sql_database, url: 'sqlite:///shop.db', tables: [orders]}\n"
                    f"    destination: {{kind: filesystem, bucket_url: '{workdir / 'lake'}'}}\n")
    spec = ConnectorRegistry.load(path).get("lake")
    summary = run_connector(spec, workspace)
    assert summary.rows == {"orders": 100} and summary.destination == "filesystem"
    files = list((workdir / "lake" / "raw" / "orders").glob("*.parquet"))
    assert files and sum(pq.read_table(f).num_rows for f in files) == 100
    schema = destination_schema(spec, workspace)
    assert schema["source"] == "dlt_schema"
    assert {c["name"] for c in schema["tables"]["orders"]} >= {"id", "customer_id", "status", "amount_cents"}


def test_a_schema_read_after_a_first_run_that_loaded_nothing_is_empty(workdir, workspace):
    """A first run that failed before extracting leaves a pipeline folder without a schema: reading the
    connector's schema then answers no tables (it raised AttributeError on the missing schema)."""
    from connectors.schema import destination_schema

    path = workdir / "lake.yaml"
    path.write_text("connectors:\n  lake:\n    source: {kind: sql_database, url: 'sqlite:///missing.db', "
                    "tables: [orders]}\n"
                    f"    destination: {{kind: filesystem, bucket_url: '{workdir / 'lake'}'}}\n")
    spec = ConnectorRegistry.load(path).get("lake")
    with pytest.raises(ConnectorRunError):
        run_connector(spec, workspace)
    assert (workspace.pipelines_dir / spec.pipeline_name / "state.json").exists()
    assert destination_schema(spec, workspace) == {"source": "dlt_schema", "location": None, "tables": {}}


def test_a_postgresql_destination_receives_the_rows(workdir, workspace, postgres_url):
    import uuid

    import sqlalchemy as sa

    from tests.support.postgres import POSTGRES_URL

    dataset = f"flowgate_dest_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(POSTGRES_URL)
    # dlt's postgres credentials insist on a password; a trust-auth server ignores it.
    plain_url = url.set(drivername="postgresql", password=url.password or "unused").render_as_string(hide_password=False)
    path = workdir / "pg.yaml"
    path.write_text("connectors:\n  to_pg:\n    source: {kind: sql_database, url: 'sqlite:///shop.db', tables: [orders]}\n"
                    f"    destination: {{kind: postgres, credentials: '{plain_url}'}}\n    dataset: {dataset}\n")
    engine = sa.create_engine(POSTGRES_URL)
    try:
        summary = run_connector(ConnectorRegistry.load(path).get("to_pg"), workspace)
        assert summary.rows == {"orders": 100} and summary.location is None
        with engine.connect() as connection:
            assert connection.execute(sa.text(f"SELECT count(*) FROM {dataset}.orders")).scalar() == 100
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {dataset} CASCADE"))
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {dataset}_staging CASCADE"))
        engine.dispose()


def test_an_incremental_sql_load_takes_only_new_rows_on_the_second_run(workdir, workspace):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(50)])
    spec = incremental_registry(workdir, "append").get("inc")
    assert run_connector(spec, workspace).rows == {"events": 50}
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 50:02d}") for i in range(50, 60)])
    second = run_connector(spec, workspace)
    assert second.rows == {"events": 10}
    assert count(second.location, "raw.events") == 60
    assert run_connector(spec, workspace).rows == {}  # nothing new


def test_merge_with_the_primary_key_updates_rows_in_place(workdir, workspace):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(20)])
    spec = incremental_registry(workdir, "merge").get("inc")
    first = run_connector(spec, workspace)
    events_db(workdir / "events.db", [(3, "shipped", "2025-02-01T00:00:00")])
    assert run_connector(spec, workspace).rows == {"events": 1}
    with duckdb.connect(first.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.events").fetchone()[0] == 20
        assert con.execute("SELECT status FROM raw.events WHERE id = 3").fetchone()[0] == "shipped"


def test_params_move_the_initial_value_or_force_a_full_refresh(workdir, workspace):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-{1 + i:02d}T00:00:00") for i in range(10)])
    spec = incremental_registry(workdir, "append").get("inc")
    assert run_connector(spec.with_params({"initial_value": "2025-01-06T00:00:00"}), workspace).rows == {"events": 5}
    assert run_connector(spec, workspace).rows == {}  # the state remembers where the last run stopped
    refreshed = run_connector(spec.with_params({"full_refresh": True}), workspace)
    assert refreshed.rows == {"events": 10} and count(refreshed.location, "raw.events") == 10
    with pytest.raises(ParamsError) as info:
        spec.with_params({"full_refresh": "yes"})
    assert info.value.field == "params.full_refresh"
    with pytest.raises(ParamsError, match="overridable: tables\\)"):
        ConnectorRegistry.load(workdir / "connectors.yaml").get("shop").with_params({"initial_value": 1})


def test_an_incremental_filesystem_source_reads_only_files_modified_since_the_last_run(workdir, workspace):
    import os

    folder = workdir / "drop"
    folder.mkdir()
    (folder / "a.csv").write_text("id,name\n1,a\n2,b\n")
    os.utime(folder / "a.csv", (1_700_000_000, 1_700_000_000))
    path = workdir / "drop.yaml"
    path.write_text("connectors:\n  drop:\n    source: {kind: filesystem, bucket_url: drop, file_glob: '*.csv', "
                    "incremental: true}\n")
    spec = ConnectorRegistry.load(path).get("drop")
    assert run_connector(spec, workspace).rows == {"drop": 2}
    (folder / "b.csv").write_text("id,name\n3,c\n")
    second = run_connector(spec, workspace)
    assert second.rows == {"drop": 1} and count(second.location, "raw.drop") == 3


def _run_through_a_gateway(app_config: dict, connectors_file: Path) -> dict:
    """Start a gateway process's worth of services, trigger `inc` once, wait for it, shut everything down."""
    from app import create_app
    from tests.support.waiting import wait_until_ended

    app = create_app({**app_config, "connectors_file": connectors_file})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        accepted = client.post("/trigger", json={"connector_id": "inc"})
        return wait_until_ended(client, accepted.json["status_url"])
    finally:
        services.stop(timeout=10)
        services.store.dispose()


def test_incremental_state_survives_a_gateway_restart_and_the_loss_of_dlts_working_dir(workdir, app_config):
    import shutil

    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(30)])
    connectors_file = incremental_registry(workdir, "append").path
    assert _run_through_a_gateway(app_config, connectors_file)["result"]["rows"] == {"events": 30}

    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 30:02d}") for i in range(30, 35)])
    second = _run_through_a_gateway(app_config, connectors_file)  # a new gateway on the same var/
    assert second["result"]["rows"] == {"events": 5}

    # A new machine with only the destination: dlt restores the cursor from the DuckDB file itself.
    shutil.rmtree(Path(app_config["var_dir"]) / "dlt")
    events_db(workdir / "events.db", [(35, "new", "2025-01-03T00:00:00")])
    third = _run_through_a_gateway(app_config, connectors_file)
    assert third["status"] == "completed", third["error"]
    assert third["result"]["rows"] == {"events": 1}
    assert count(str(connectors_file.parent / third["result"]["location"]), "raw.events") == 36


def test_a_connector_whose_dataset_has_its_name_loads_into_its_default_duckdb_file(workdir, workspace):
    """DuckDB can't tell a catalog (the file's name) from a schema of that name: the default file avoids it."""
    path = workdir / "connectors.yaml"
    path.write_text("connectors:\n  orders:\n    source: {kind: python, ref: 'connectors.demo:numbers', args: {n: 3}}\n"
                    "    dataset: orders\n")
    spec = ConnectorRegistry.load(path).get("orders")
    first = run_connector(spec, workspace)
    second = run_connector(spec, workspace)
    assert first.rows == second.rows == {"numbers": 3}
    with duckdb.connect(first.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM orders.numbers").fetchone()[0] == 6
