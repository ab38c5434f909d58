"""preview_connector: extract a few rows per resource, load nothing, change no state (debugging a connector config);
preview_changes: which of the sampled tables and columns the destination does not have yet, and which of those
the connector's schema contract would refuse."""
from __future__ import annotations

import itertools
from typing import Any

from connectors.outbound import OutboundPolicy
from connectors.pipeline import ConnectorRunError, Workspace, build_source
from connectors.schema import destination_schema
from connectors.spec import ConnectorSpec, SqlDatabaseSource


def preview_connector(spec: ConnectorSpec, limit: int, outbound: OutboundPolicy) -> dict[str, Any]:
    """Up to `limit` sample rows per resource and the columns inferred from them; no pipeline is created. A rest_api
    source calls only the hosts `outbound` allows."""
    if isinstance(spec.source, SqlDatabaseSource):  # read no more than needed from the database
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"chunk_size": limit})})
    try:
        source = build_source(spec, outbound)
        resources = source.selected_resources.values() if hasattr(source, "selected_resources") else [source]
        return {"resources": {resource.name: {"table": _table_name(resource), **_sample(resource, limit)}
                              for resource in resources}}
    except ConnectorRunError:
        raise
    except Exception as exc:  # any source failure is the answer a connector author needs
        raise ConnectorRunError.of(spec.id, "extract", exc) from exc


def _sample(resource: Any, limit: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    columns: dict[str, str] = {}
    arrow = False
    for item in itertools.islice(resource.add_limit(limit), limit):
        if hasattr(item, "schema") and hasattr(item, "to_pylist"):  # an Arrow table or batch
            arrow = True
            columns.update({field.name: str(field.type) for field in item.schema})
            rows.extend(item.to_pylist()[: limit - len(rows)])
        else:
            for row in item if isinstance(item, list) else [item]:
                if len(rows) < limit:
                    rows.append(row)
                    columns.update({k: type(v).__name__ for k, v in row.items() if k not in columns})
        if len(rows) >= limit:
            break
    return {"format": "arrow" if arrow else "objects", "rows": rows, "columns": columns}


def preview_changes(spec: ConnectorSpec, workspace: Workspace, resources: dict[str, Any]) -> dict[str, Any]:
    """Per table of a preview's `resources`: whether the destination lacks it, the sampled columns it lacks (names
    as dlt would write them) and what the connector's schema contract would refuse; only tables with something
    new. Types are not compared (a sample's Python or Arrow types are not the destination's). Raises
    DestinationBusy while a load holds the destination."""
    from dlt.common.normalizers.naming.snake_case import NamingConvention

    naming = NamingConvention()
    loaded = destination_schema(spec, workspace)
    existing = {table: {column["name"] for column in columns} for table, columns in loaded["tables"].items()}
    contract = spec.schema_contract
    tables: dict[str, Any] = {}
    for sample in resources.values():
        table = naming.normalize_table_identifier(sample["table"])
        sampled = _sampled_columns(sample, naming)
        known = existing.get(table)
        new_columns = [{"name": name, "type": kind} for name, kind in sampled.items() if name not in (known or ())]
        if known is not None and not new_columns:
            continue
        refused = []
        if known is None and contract and contract.tables not in (None, "evolve"):
            refused.append({"entity": "tables", "column": None, "mode": contract.tables})
        elif known is not None and contract and contract.columns not in (None, "evolve"):
            refused += [{"entity": "columns", "column": column["name"], "mode": contract.columns}
                        for column in new_columns]
        tables[table] = {"new_table": known is None, "new_columns": new_columns, "refused": refused}
    return {"compared_with": loaded["source"], "tables": tables}


def _table_name(resource: Any) -> str:
    """The table a resource writes (its name, when the table name is computed per item)."""
    table = getattr(resource, "table_name", None)
    return table if isinstance(table, str) else resource.name


def _sampled_columns(sample: dict[str, Any], naming: Any) -> dict[str, str]:
    """Column name (normalized, nested objects flattened as dlt does) -> sampled type; a column only ever null
    makes none, as in dlt, and a list becomes a nested table, not a column."""
    if sample["format"] == "arrow":  # an Arrow table's schema is the table's, nulls and structs included
        return {naming.normalize_identifier(name): kind for name, kind in sample["columns"].items()}
    columns: dict[str, str] = {}

    def add(row: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in row.items():
            fragment = naming.normalize_identifier(key)
            if isinstance(value, dict):
                add(value, (*path, fragment))
            elif value is not None and not isinstance(value, list):
                columns.setdefault(naming.shorten_fragments(*path, fragment), type(value).__name__)

    for row in sample["rows"]:
        if isinstance(row, dict):
            add(row, ())
    return columns
