"""RunReport: what one connector run did to the data, gathered step by step: rows per table of every package it
loaded (a killed run's too), schema changes against the schema the destination held before the run, incremental
windows, and inserted versus updated rows of merge loads.

Merge counts compare a table's row count before and after the load (a DuckDB `count(*)` reads no rows), so
`inserted` is how much the table grew and `updated` the rest of the rows loaded into it: exact for dlt's
delete-insert merge, off by the rows deleted where a source sends hard deletes.
"""
from __future__ import annotations

import datetime
import decimal
import json
import logging
from pathlib import Path
from typing import Any

from connectors.dlt_recovery import PackageRows, incremental_cursors

log = logging.getLogger(__name__)


class RunReport:
    """Rows, load ids, schema changes, incremental windows and merge counts of one run, for its LoadSummary."""

    def __init__(self, working_dir: Path, count_merges: bool):
        self.package_rows = PackageRows(working_dir)
        self.count_merges = count_merges  # only where a count is cheap (DuckDB)
        self.rows: dict[str, int] = {}
        self.load_ids: list[str] = []
        self.merge: dict[str, dict[str, int]] = {}
        self.incremental: dict[str, dict[str, Any]] = {}
        self._tables_before: dict[str, Any] | None = None
        self._cursors_before: dict[tuple[str, str], dict[str, Any]] = {}
        # What a later step needs of an earlier one (the schema recover found, the windows extract saw), kept in
        # the working folder: the Prefect flow runs each step in a process of its own. Recover starts it afresh.
        self._notes = working_dir / "flowgate_report.json"
        self._take_up_notes()

    # --- the steps tell --------------------------------------------------------------------------------

    def schema_before(self, pipeline: Any) -> None:
        """Remember the tables the destination's stored schema holds now (after recover synced with it); a run's
        notes start here."""
        self._tables_before = stored_tables(pipeline)
        self.incremental = {}
        self._write_notes()

    def before_extract(self, pipeline: Any, refresh: bool) -> None:
        """Remember where every incremental cursor stands (nowhere, when a full refresh drops the state)."""
        self._cursors_before = {} if refresh else incremental_cursors(pipeline.state)

    def extracted(self, pipeline: Any, info: Any) -> None:
        """Keep the rows of each package extracted, and the window of every cursor that moved through."""
        for load_id, rows in _rows_per_package(info).items():
            self.package_rows.record(load_id, rows)
        steps = [step for metrics in info.metrics.values() for step in metrics]
        edges = [tuple(edge) for step in steps for edge in step.get("dag", [])]
        extracted = {name for step in steps for name in step.get("resource_metrics", {})} | \
                    {name for edge in edges for name in edge}
        for (resource, cursor_path), cursor in incremental_cursors(pipeline.state).items():
            if resource not in extracted:
                continue  # a resource this run did not read (another table list, a resource since removed)
            before = self._cursors_before.get((resource, cursor_path))
            start = before["last_value"] if before else cursor["initial_value"]
            for table in _root_tables_of(resource, edges, pipeline):
                self.incremental[table] = {"cursor_path": cursor_path, "from": _json_value(start),
                                           "to": _json_value(cursor["last_value"])}
        self._write_notes()

    def normalized(self, info: Any) -> None:
        """Replace each package's extracted counts with the normalized ones (nested tables included)."""
        for load_id, rows in _rows_per_package(info).items():
            self.package_rows.record(load_id, rows)

    def before_load(self, pipeline: Any) -> dict[str, int]:
        """Row counts of the merge tables, to tell inserted from updated rows after the load."""
        return count_rows(pipeline, merge_tables(pipeline)) if self.count_merges else {}

    def loaded(self, pipeline: Any, info: Any, merge_counts_before: dict[str, int]) -> None:
        """Count the rows of every package the load completed."""
        loaded: dict[str, int] = {}
        for load_id in info.loads_ids if info else ():
            self.load_ids.append(load_id)
            rows = self.package_rows.take(load_id)
            if rows is None:
                log.warning("load package %s loaded, but its rows were never counted (made by another flowgate "
                            "version, or killed in the instant its step committed it): not in the summary", load_id)
            for table, count in (rows or {}).items():
                loaded[table] = loaded.get(table, 0) + count
                self.rows[table] = self.rows.get(table, 0) + count
        if merge_counts_before:
            after = count_rows(pipeline, list(merge_counts_before))
            for table, before in merge_counts_before.items():
                inserted = max(after[table] - before, 0)
                previous = self.merge.get(table, {"inserted": 0, "updated": 0})
                self.merge[table] = {"inserted": previous["inserted"] + inserted,
                                     "updated": previous["updated"] + max(loaded.get(table, 0) - inserted, 0)}

    def _write_notes(self) -> None:
        written = self._notes.with_suffix(".tmp")
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps({"tables_before": self._tables_before, "incremental": self.incremental}))
        written.replace(self._notes)

    def _take_up_notes(self) -> None:
        try:
            notes = json.loads(self._notes.read_text())
        except (FileNotFoundError, ValueError):
            return
        self._tables_before, self.incremental = notes.get("tables_before"), notes.get("incremental") or {}

    # --- the summary asks -------------------------------------------------------------------------------

    def schema_changes(self, pipeline: Any) -> dict[str, dict[str, Any]]:
        """Per table: new, and its new columns, variant columns and type changes, against the schema before."""
        if self._tables_before is None or not pipeline.default_schema_name:
            return {}
        return schema_changes(self._tables_before, pipeline.default_schema.data_tables(seen_data_only=True))

    def incremental_windows(self) -> dict[str, dict[str, Any]]:
        """Each incremental table's window: the cursor, where the run started and ended, the rows it loaded."""
        return {table: {**window, "rows": self.rows.get(table, 0)} for table, window in self.incremental.items()}


def schema_changes(before: dict[str, Any], after: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tables of `after` (dlt table schemas) that are new or changed against `before` (tables by name)."""
    changes = {}
    for table in after:
        old = before.get(table["name"])
        old_columns = (old or {}).get("columns", {})
        new: list[dict[str, Any]] = []
        variants: list[dict[str, Any]] = []
        retyped: list[dict[str, Any]] = []
        for column in table.get("columns", {}).values():
            name, data_type = column["name"], column.get("data_type")
            if not data_type or name.startswith("_dlt"):
                continue  # incomplete (no value seen yet), or dlt's own
            previous = old_columns.get(name, {}).get("data_type")
            if previous is None:
                (variants if column.get("variant") else new).append({"name": name, "type": data_type})
            elif previous != data_type:
                retyped.append({"name": name, "from": previous, "to": data_type})
        if old is None or new or variants or retyped:
            changes[table["name"]] = {"new_table": old is None, "new_columns": new, "variant_columns": variants,
                                      "type_changes": retyped}
    return changes


def stored_tables(pipeline: Any) -> dict[str, Any]:
    """The tables of the newest schema version the destination stored for the pipeline's default schema; empty
    before its first load (destinations that store no schema: the pipeline's own schema)."""
    from dlt.common.destination.client import WithStateSync

    name = pipeline.default_schema_name
    if not name:
        return {}
    with pipeline.destination_client(name) as client:
        if not isinstance(client, WithStateSync):
            return json.loads(json.dumps(pipeline.default_schema.tables))
        stored = client.get_stored_schema(name)
    return json.loads(stored.schema)["tables"] if stored else {}


def merge_tables(pipeline: Any) -> list[str]:
    """The root tables the pipeline merges into that hold data."""
    if not pipeline.default_schema_name:
        return []
    return [table["name"] for table in pipeline.default_schema.data_tables(seen_data_only=True)
            if table.get("write_disposition") == "merge" and not table.get("parent")]


def count_rows(pipeline: Any, tables: list[str]) -> dict[str, int]:
    """Rows in each of `tables` at the destination (0 for a table not created yet)."""
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    counts: dict[str, int] = {}
    if not tables:
        return counts
    with pipeline.sql_client() as client:
        for table in tables:
            try:
                rows = client.execute_sql(f"SELECT count(*) FROM {client.make_qualified_table_name(table)}")
                counts[table] = rows[0][0]
            except DatabaseUndefinedRelation:
                counts[table] = 0
    return counts


def _rows_per_package(info: Any) -> dict[str, dict[str, int]]:
    """Rows per data table of each package a dlt step info (extract, normalize) tells of."""
    packages = {}
    for load_id, metrics in (info.metrics.items() if info else ()):
        rows: dict[str, int] = {}
        for step in metrics:
            for table, written in step["table_metrics"].items():
                if not table.startswith("_dlt"):
                    rows[table] = rows.get(table, 0) + written.items_count
        packages[load_id] = rows
    return packages


def _root_tables_of(resource: str, edges: list[tuple[str, str]], pipeline: Any) -> list[str]:
    """The root tables a resource writes, itself or through the resources piped from it (dlt's extract dag)."""
    names, grown = {resource}, True
    while grown:
        more = {child for parent, child in edges if parent in names} - names
        names |= more
        grown = bool(more)
    return [table["name"] for table in pipeline.default_schema.data_tables()
            if table.get("resource") in names and not table.get("parent")]


def _json_value(value: Any) -> Any:
    """A cursor value as JSON can carry it: dates and times in ISO 8601, decimals as text."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
