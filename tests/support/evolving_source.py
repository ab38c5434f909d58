"""Python sources whose rows each run gives as a param, so a test can add a column, change a value's type or move
an incremental cursor between two runs of one connector."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dlt


@dlt.resource(name="items")
def items(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """`rows`, as they are."""
    yield rows


BY_ID = dlt.sources.incremental("id")  # dlt finds a resource's cursor in its signature's defaults


@dlt.resource(name="items")
def tracked_items(rows: list[dict[str, Any]], cursor: Any = BY_ID) -> Iterator[list[dict[str, Any]]]:
    """`rows`, of which dlt loads those past the last run's largest id."""
    yield rows


def connectors_yaml(path: Any, ref: str = "items", contract: str | None = None) -> Any:
    """A connectors.yaml at `path` with one connector `items` reading `ref` (its rows from params)."""
    contract_line = f"    schema_contract: {contract}\n" if contract else ""
    path.write_text(f"connectors:\n  items:\n    source: {{kind: python, ref: 'tests.support.evolving_source:{ref}', "
                    f"args: {{rows: []}}}}\n{contract_line}")
    return path
