"""What a run says it changed, on real dlt loads into DuckDB: schema changes, incremental windows, merge counts, and
the rows of a package an interrupted run left, counted by the run that loads it."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import duckdb
import pytest

from connectors.pipeline import ConnectorPipeline, Workspace, run_connector
from connectors.registry import ConnectorRegistry
from tests.support.evolving_source import connectors_yaml
from tests.support.incremental import events_db, incremental_registry


@pytest.fixture
def workspace(workdir: Path) -> Workspace:
    return Workspace(pipelines_dir=workdir / "var" / "dlt", duckdb_dir=workdir / "var" / "duckdb")


def _columns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "type": data_type} for name, data_type in pairs]


def test_a_first_run_reports_its_tables_as_new_and_a_later_run_only_the_column_it_added(workdir, workspace):
    spec = ConnectorRegistry.load(connectors_yaml(workdir / "items.yaml")).get("items")
    first = run_connector(spec.with_params({"rows": [{"id": 1, "name": "a"}]}), workspace)
    assert first.schema_changes == {"items": {"new_table": True, "variant_columns": [], "type_changes": [],
                                              "new_columns": _columns(("id", "bigint"), ("name", "text"))}}
    second = run_connector(spec.with_params({"rows": [{"id": 2, "name": "b", "score": 1.5}]}), workspace)
    assert second.schema_changes == {"items": {"new_table": False, "new_columns": _columns(("score", "double")),
                                               "variant_columns": [], "type_changes": []}}
    assert run_connector(spec.with_params({"rows": [{"id": 3, "name": "c"}]}), workspace).schema_changes == {}


def test_a_value_of_another_type_is_reported_as_a_variant_column(workdir, workspace):
    spec = ConnectorRegistry.load(connectors_yaml(workdir / "items.yaml")).get("items")
    run_connector(spec.with_params({"rows": [{"id": 1, "value": 5}]}), workspace)
    changed = run_connector(spec.with_params({"rows": [{"id": 2, "value": "five"}]}), workspace)
    assert changed.schema_changes == {"items": {"new_table": False, "new_columns": [], "type_changes": [],
                                                "variant_columns": _columns(("value__v_text", "text"))}}


def test_a_full_refresh_after_a_column_changed_type_reports_the_type_change(workdir, workspace):
    with sqlite3.connect(workdir / "typed.db") as con:
        con.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, value INTEGER)")
        con.execute("INSERT INTO readings VALUES (1, 5)")
    path = workdir / "typed.yaml"
    path.write_text("connectors:\n  typed:\n    source: {kind: sql_database, url: 'sqlite:///typed.db', "
                    "tables: [readings]}\n    write_disposition: replace\n    allow_full_refresh: true\n")
    spec = ConnectorRegistry.load(path).get("typed")
    run_connector(spec, workspace)
    with sqlite3.connect(workdir / "typed.db") as con:
        con.execute("DROP TABLE readings")
        con.execute("CREATE TABLE readings (id INTEGER PRIMARY KEY, value TEXT)")
        con.execute("INSERT INTO readings VALUES (1, 'five')")
    refreshed = run_connector(spec.with_params({"full_refresh": True}), workspace)  # dlt alters no column type
    assert refreshed.schema_changes == {"readings": {
        "new_table": False, "new_columns": [], "variant_columns": [],
        "type_changes": [{"name": "value", "from": "bigint", "to": "text"}]}}


def test_a_table_loaded_for_the_first_time_is_reported_new_and_the_others_not(workdir, workspace):
    shop = ConnectorRegistry.load(workdir / "connectors.yaml").get("shop")
    assert set(run_connector(shop.with_params({"tables": ["orders"]}), workspace).schema_changes) == {"orders"}
    both = run_connector(shop, workspace)
    assert list(both.schema_changes) == ["customers"] and both.schema_changes["customers"]["new_table"]
    assert {c["name"] for c in both.schema_changes["customers"]["new_columns"]} == {
        "id", "name", "email", "country", "created_on"}


def test_an_incremental_window_runs_from_the_last_cursor_to_the_new_one_over_three_runs(workdir, workspace):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(50)])
    spec = incremental_registry(workdir, "append").get("inc")
    first = run_connector(spec, workspace)
    assert first.incremental == {"events": {"cursor_path": "updated_at", "from": None,
                                            "to": "2025-01-01T00:00:49", "rows": 50}}
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 50:02d}") for i in range(50, 60)])
    second = run_connector(spec, workspace)
    assert second.incremental == {"events": {"cursor_path": "updated_at", "from": "2025-01-01T00:00:49",
                                             "to": "2025-01-02T00:00:09", "rows": 10}}
    third = run_connector(spec, workspace)  # nothing new: an empty window
    assert third.incremental == {"events": {"cursor_path": "updated_at", "from": "2025-01-02T00:00:09",
                                            "to": "2025-01-02T00:00:09", "rows": 0}}
    assert first.merge == second.merge == {}  # append


def test_a_merge_load_tells_rows_inserted_from_rows_updated(workdir, workspace):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(20)])
    spec = incremental_registry(workdir, "merge").get("inc")
    assert run_connector(spec, workspace).merge == {"events": {"inserted": 20, "updated": 0}}
    events_db(workdir / "events.db", [(3, "shipped", "2025-02-01T00:00:00"), (20, "new", "2025-02-01T00:00:01")])
    second = run_connector(spec, workspace)
    assert second.rows == {"events": 2} and second.merge == {"events": {"inserted": 1, "updated": 1}}
    with duckdb.connect(second.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.events").fetchone()[0] == 21


@pytest.mark.parametrize("left_after", [("recover", "extract", "normalize"), ("recover", "extract")])
def test_the_rows_of_a_package_an_interrupted_run_left_are_counted_by_the_run_that_loads_it(
        workdir, workspace, left_after):
    events_db(workdir / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(40)])
    spec = incremental_registry(workdir, "append").get("inc")
    run_connector(spec, workspace)
    events_db(workdir / "events.db", [(i, "new", f"2025-01-02T00:00:{i - 40:02d}") for i in range(40, 45)])
    interrupted = ConnectorPipeline(spec, workspace)  # a run that stopped after these steps (killed, in effect)
    for step in left_after:
        interrupted.run_step(step)

    recovering = run_connector(spec, workspace)
    assert recovering.rows == {"events": 5} and len(recovering.load_ids) == 1  # nothing new of its own
    events_db(workdir / "events.db", [(i, "new", f"2025-01-03T00:00:{i - 45:02d}") for i in range(45, 48)])
    assert run_connector(spec, workspace).rows == {"events": 3}
    with duckdb.connect(recovering.location, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM raw.events").fetchone()[0] == 48
    assert not list((workspace.pipelines_dir / "flowgate_inc" / "flowgate_rows").iterdir())
