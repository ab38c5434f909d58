"""SchemaContractViolation: a run dlt's schema contract stopped, with the table, column and contract that refused."""
from __future__ import annotations

from typing import Any

from connectors.pipeline import ConnectorRunError


class SchemaContractViolation(ConnectorRunError):
    """dlt refused data under the connector's schema contract: a new `table`, or a new `column` (`entity` columns)
    or data type (`entity` data_type) in it, against the contract's `mode` for that entity. Terminal: the same
    data meets the same contract again."""

    def __init__(self, connector_id: str, step: str, table: str, column: str | None, entity: str, mode: str):
        what = {"tables": f"new table '{table}'", "columns": f"new column '{column}' in table '{table}'",
                "data_type": f"new data type of column '{column}' in table '{table}'"}.get(entity, f"table '{table}'")
        super().__init__(connector_id, step, f"the schema contract refused the {what} "
                                             f"(schema_contract.{entity}: {mode})", terminal=True)
        self.table = table
        self.column = column
        self.entity = entity
        self.mode = mode

    def facts(self) -> dict[str, Any]:
        """The table, column, contract entity and mode, as a run's error carries them."""
        return {"table": self.table, "column": self.column, "entity": self.entity, "mode": self.mode}


def contract_violation(exc: BaseException | None) -> Any:
    """The DataValidationError (dlt's schema contract refusing data) behind a step's failure, or None."""
    from dlt.common.schema.exceptions import DataValidationError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataValidationError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "exception", None) or exc.__cause__ or exc.__context__
    return None
