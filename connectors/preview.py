"""preview_connector: extract a few rows per resource, load nothing, change no state (debugging a connector config)."""
from __future__ import annotations

import itertools
from typing import Any

from connectors.pipeline import ConnectorRunError, build_source
from connectors.spec import ConnectorSpec, SqlDatabaseSource


def preview_connector(spec: ConnectorSpec, limit: int) -> dict[str, Any]:
    """Up to `limit` sample rows per resource and the columns inferred from them; no pipeline is created."""
    if isinstance(spec.source, SqlDatabaseSource):  # read no more than needed from the database
        spec = spec.model_copy(update={"source": spec.source.model_copy(update={"chunk_size": limit})})
    try:
        source = build_source(spec)
        resources = source.selected_resources.values() if hasattr(source, "selected_resources") else [source]
        return {"resources": {resource.name: _sample(resource, limit) for resource in resources}}
    except ConnectorRunError:
        raise
    except Exception as exc:  # any source failure is the answer a connector author needs
        raise ConnectorRunError(spec.id, "extract", f"{type(exc).__name__}: {exc}") from exc


def _sample(resource: Any, limit: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    columns: dict[str, str] = {}
    for item in itertools.islice(resource.add_limit(limit), limit):
        if hasattr(item, "schema") and hasattr(item, "to_pylist"):  # an Arrow table or batch
            columns.update({field.name: str(field.type) for field in item.schema})
            rows.extend(item.to_pylist()[: limit - len(rows)])
        else:
            for row in item if isinstance(item, list) else [item]:
                if len(rows) < limit:
                    rows.append(row)
                    columns.update({k: type(v).__name__ for k, v in row.items() if k not in columns})
        if len(rows) >= limit:
            break
    return {"rows": rows, "columns": columns}
