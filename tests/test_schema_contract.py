"""A connector's schema contract, passed to dlt: data it refuses fails the run at the step dlt finds it, with a
terminal schema_contract_violation, and leaves the destination and the connector's state as they were."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import get_args

import duckdb
import pytest

from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry
from connectors.schema_contract import SchemaContractViolation
from connectors.spec import CONTRACT_MODES, SchemaContractSpec
from flows.outcome import RunError
from tests.support.evolving_source import connectors_yaml
from tests.support.waiting import wait_until_ended


@pytest.fixture
def workspace(workdir: Path) -> Workspace:
    return Workspace(pipelines_dir=workdir / "var" / "dlt", duckdb_dir=workdir / "var" / "duckdb")


def table_state(path: str, table: str) -> tuple[list[str], int]:
    """A table's columns (dlt's own left out) and its row count."""
    with duckdb.connect(path, read_only=True) as con:
        columns = [name for (name,) in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table]).fetchall() if not name.startswith("_dlt")]
        return columns, con.execute(f"SELECT count(*) FROM raw.{table}").fetchone()[0]


def test_the_contract_modes_are_dlts():
    from dlt.common.schema.typing import TSchemaEvolutionMode

    assert set(CONTRACT_MODES) == set(get_args(TSchemaEvolutionMode))


def test_a_new_column_under_freeze_fails_normalize_and_the_next_run_takes_the_same_rows_again(workdir, workspace):
    evolving = ConnectorRegistry.load(connectors_yaml(workdir / "a.yaml", "tracked_items")).get("items")
    frozen = ConnectorRegistry.load(connectors_yaml(workdir / "b.yaml", "tracked_items", "freeze")).get("items")
    first = run_connector(evolving.with_params({"rows": [{"id": 1, "name": "a"}]}), workspace)
    before = table_state(first.location, "items")

    new_rows = {"rows": [{"id": 1, "name": "a"}, {"id": 2, "name": "b", "score": 0.5}]}
    with pytest.raises(SchemaContractViolation) as info:
        run_connector(frozen.with_params(new_rows), workspace)
    refused = info.value
    assert (refused.step, refused.table, refused.column, refused.entity, refused.mode) == (
        "normalize", "items", "score", "columns", "freeze")
    assert refused.terminal and "new column 'score' in table 'items'" in refused.message
    error = RunError.of(refused)
    assert (error.code, error.terminal, error.step) == ("schema_contract_violation", True, "normalize")
    assert error.contract == {"table": "items", "column": "score", "entity": "columns", "mode": "freeze"}
    assert table_state(first.location, "items") == before == (["id", "name"], 1)  # the destination untouched

    # The refused package was aborted and the cursor rewound: lifted, the contract lets the same row in.
    assert not (workspace.pipelines_dir / "flowgate_items" / "normalize" / "extracted").exists() or not list(
        (workspace.pipelines_dir / "flowgate_items" / "normalize" / "extracted").iterdir())
    lifted = ConnectorRegistry.load(connectors_yaml(workdir / "c.yaml", "tracked_items", "evolve")).get("items")
    again = run_connector(lifted.with_params(new_rows), workspace)
    assert again.rows == {"items": 1} and table_state(first.location, "items") == (["id", "name", "score"], 2)


def test_an_arrow_source_is_refused_at_extract_and_its_cursor_stays(workdir, workspace):
    with sqlite3.connect(workdir / "events.db") as con:
        con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, status TEXT)")
        con.executemany("INSERT INTO events VALUES (?, 'new')", [(i,) for i in range(10)])
    path = workdir / "events.yaml"
    path.write_text("connectors:\n  inc:\n    source: {kind: sql_database, url: 'sqlite:///events.db', "
                    "tables: [events], incremental: {cursor: id}}\n")
    spec = ConnectorRegistry.load(path).get("inc")
    first = run_connector(spec, workspace)
    with sqlite3.connect(workdir / "events.db") as con:
        con.execute("ALTER TABLE events ADD COLUMN note TEXT")
        con.executemany("INSERT INTO events VALUES (?, 'new', 'late')", [(i,) for i in range(10, 13)])

    frozen = spec.model_copy(update={"schema_contract": SchemaContractSpec(columns="freeze")})
    with pytest.raises(SchemaContractViolation) as info:
        run_connector(frozen, workspace)
    assert (info.value.step, info.value.table, info.value.column) == ("extract", "events", "note")
    assert table_state(first.location, "events") == (["id", "status"], 10)
    assert run_connector(spec, workspace).rows == {"events": 3}  # the refused run moved no cursor


def test_a_new_table_under_a_frozen_tables_contract_is_refused(workdir, workspace):
    spec = ConnectorRegistry.load(workdir / "connectors.yaml").get("shop")
    run_connector(spec.with_params({"tables": ["orders"]}), workspace)
    frozen = spec.model_copy(update={"schema_contract": SchemaContractSpec(tables="freeze")})
    with pytest.raises(SchemaContractViolation) as info:
        run_connector(frozen, workspace)
    assert (info.value.table, info.value.column, info.value.entity) == ("customers", None, "tables")
    assert "new table 'customers'" in info.value.message


def test_preview_names_what_the_contract_would_refuse_and_the_run_then_fails_with_its_code(app_config, workdir):
    from app import create_app

    connectors = connectors_yaml(workdir / "items.yaml", "items", "{columns: freeze}")
    app = create_app({**app_config, "connectors_file": connectors})
    services = app.extensions["flowgate"]
    services.start()
    try:
        client = app.test_client()
        first = {"rows": [{"id": 1, "name": "a"}]}
        preview = client.post("/api/v1/connectors/items/preview", json={"params": first}).json
        assert preview["changes"] == {"compared_with": "destination", "tables": {"items": {
            "new_table": True, "new_columns": [{"name": "id", "type": "int"}, {"name": "name", "type": "str"}],
            "refused": []}}}  # a new table takes its columns whatever the columns contract
        done = client.post("/api/v1/connectors/items/runs", json={"params": first, "wait": 60}).json
        assert done["status"] == "completed" and done["result"]["schema_changes"]["items"]["new_table"]

        second = {"rows": [{"id": 2, "name": "b", "Extra Info": {"Source": "x"}}]}
        preview = client.post("/api/v1/connectors/items/preview", json={"params": second}).json
        assert preview["changes"]["tables"] == {"items": {
            "new_table": False, "new_columns": [{"name": "extra_info__source", "type": "str"}],
            "refused": [{"entity": "columns", "column": "extra_info__source", "mode": "freeze"}]}}
        accepted = client.post("/api/v1/connectors/items/runs", json={"params": second}).json
        failed = wait_until_ended(client, accepted["status_url"])
        assert failed["status"] == "failed" and failed["result"] is None
        assert failed["error"] == {"code": "schema_contract_violation", "step": "normalize", "terminal": True,
                                   "failure_class": "terminal", "message": failed["error"]["message"],
                                   "contract": {"table": "items", "column": "extra_info__source",
                                                "entity": "columns", "mode": "freeze"}}
        assert "schema_contract.columns: freeze" in failed["error"]["message"]
        assert table_state(str(workdir / done["result"]["location"]), "items") == (["id", "name"], 1)
    finally:
        services.stop(timeout=10)
        services.store.dispose()
