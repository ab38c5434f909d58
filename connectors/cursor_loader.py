"""CursorArrowLoader: dlt's pyarrow table loader, reading rows from the raw DBAPI cursor instead of SQLAlchemy rows.

dlt's own pyarrow backend streams `Result.partitions()`, which builds a SQLAlchemy Row for every row
before dlt turns the rows back into tuples for Arrow; py-spy put ~80% of the extract step there. This
loader keeps everything else of dlt's (the query with its incremental WHERE and ORDER BY, the column
hints, the Arrow conversion typed for the destination) and only replaces the fetch: `fetchmany` on the
driver's cursor, with SQLAlchemy's result processors applied to the columns whose type has one (SQLite
dates and decimals arrive as text and must still become dates and decimals).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dlt.sources.sql_database import TableLoader
from dlt.sources.sql_database.arrow_helpers import row_tuples_to_arrow


class CursorArrowLoader(TableLoader):
    """Yields Arrow tables of `chunk_size` rows fetched straight from the DBAPI cursor."""

    def _load_rows(self, query: Any, backend_kwargs: dict[str, Any]) -> Iterator[Any]:
        dialect = self.engine.dialect
        compiled = query.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        parameters = compiled.construct_params()
        positional = compiled.positiontup
        bound = [parameters[name] for name in positional] if positional is not None else parameters
        with self.engine.connect() as connection:
            cursor = connection.connection.cursor()
            try:
                cursor.execute(str(compiled), bound)
                names = [description[0] for description in cursor.description]
                processors = [self._processor(name, type_code, dialect)
                              for name, type_code, *_ in cursor.description]
                for name in names:  # columns present in the cursor but missing from the hints
                    self.columns.setdefault(name, {"name": name})
                columns = {name: self.columns[name] for name in names}
                tz = backend_kwargs.get("tz", "UTC")
                while rows := cursor.fetchmany(self.chunk_size):
                    yield row_tuples_to_arrow(_processed(rows, processors), columns=columns, tz=tz)
            finally:
                cursor.close()

    def _processor(self, name: str, type_code: Any, dialect: Any) -> Callable[[Any], Any] | None:
        # The cursor's type code matters: PostgreSQL's numeric processor depends on it, as in SQLAlchemy itself.
        column = self.table.c.get(name)
        if column is None:
            return None
        return column.type.dialect_impl(dialect).result_processor(dialect, type_code)


def _processed(rows: Sequence[Any], processors: list[Callable[[Any], Any] | None]) -> Sequence[Any]:
    """`rows` with each column passed through its processor; unchanged when no column has one."""
    if not any(processors):
        return rows
    columns = [list(map(proc, values)) if proc else values for values, proc in zip(zip(*rows), processors)]
    return list(zip(*columns))
