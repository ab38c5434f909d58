"""destination_schema: the tables and columns a connector has loaded, read from where the data lives."""
from __future__ import annotations

from typing import Any

from connectors.pipeline import Workspace, duckdb_path
from connectors.spec import ConnectorSpec


class DestinationBusy(RuntimeError):
    """A load holds the DuckDB file for writing (in another process or this one), or is creating it; try again."""


def destination_schema(spec: ConnectorSpec, workspace: Workspace) -> dict[str, Any]:
    """Tables (without dlt's own) with their columns and types; read-only, empty before the first load.

    DuckDB files are read directly; other destinations through the schema dlt recorded at its last load.
    """
    path = duckdb_path(spec, workspace)
    if path is not None:
        return {"source": "destination", "location": str(path), "tables": _duckdb_tables(path, spec.dataset)}
    return {"source": "dlt_schema", "location": None, "tables": _dlt_tables(spec, workspace)}


def _duckdb_tables(path: Any, dataset: str) -> dict[str, list[dict[str, Any]]]:
    import duckdb

    if not path.exists():
        return {}
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            rows = con.execute(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_schema = ? AND table_name NOT LIKE '\\_dlt\\_%' ESCAPE '\\' "
                "AND table_name NOT LIKE '\\_flowgate\\_%' ESCAPE '\\' "  # connectors/dlt_recovery.py's marks
                "ORDER BY table_name, ordinal_position", [dataset]).fetchall()
    except duckdb.OperationalError as exc:
        # IOException: "Could not set lock on file" (another process loads) or "not a valid DuckDB database file"
        # (a load is creating it); ConnectionException: this process holds it read-write ("different configuration").
        raise DestinationBusy(str(exc).splitlines()[0]) from None
    tables: dict[str, list[dict[str, Any]]] = {}
    for table, column, data_type, nullable in rows:
        tables.setdefault(table, []).append({"name": column, "type": data_type, "nullable": nullable == "YES"})
    return tables


def _dlt_tables(spec: ConnectorSpec, workspace: Workspace) -> dict[str, list[dict[str, Any]]]:
    import dlt
    from dlt.pipeline.exceptions import CannotRestorePipelineException

    try:
        pipeline = dlt.attach(spec.pipeline_name, pipelines_dir=str(workspace.pipelines_dir))
    except CannotRestorePipelineException:
        return {}
    if not pipeline.default_schema_name:  # a first run that failed before extracting anything
        return {}
    tables: dict[str, list[dict[str, Any]]] = {}
    for table in pipeline.default_schema.data_tables():
        tables[table["name"]] = [{"name": c, "type": column.get("data_type"), "nullable": column.get("nullable", True)}
                                 for c, column in table.get("columns", {}).items() if not c.startswith("_dlt")]
    return tables
