"""CursorArrowLoader gives exactly the Arrow tables dlt's own pyarrow loader gives, on SQLite and PostgreSQL."""
from __future__ import annotations

import os
from datetime import date, datetime
from decimal import Decimal

import dlt
import pyarrow as pa
import pytest
import sqlalchemy as sa
from dlt.sources.sql_database import sql_table

from connectors.cursor_loader import CursorArrowLoader

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")


def _typed_table(url: str) -> None:
    engine = sa.create_engine(url)
    metadata = sa.MetaData()
    table = sa.Table("typed", metadata,
                     sa.Column("id", sa.Integer, primary_key=True), sa.Column("at", sa.DateTime),
                     sa.Column("day", sa.Date), sa.Column("price", sa.Numeric(10, 2)), sa.Column("ok", sa.Boolean),
                     sa.Column("name", sa.String(20)), sa.Column("ratio", sa.Float))
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(table.insert(), [
            {"id": i, "at": datetime(2025, 1, 1 + i, 10, 0, i), "day": date(2025, 2, 1 + i),
             "price": Decimal(f"{i}.25"), "ok": i % 2 == 0, "name": f"n{i}", "ratio": i / 3} for i in range(9)]
            + [{"id": 99, "at": None, "day": None, "price": None, "ok": None, "name": None, "ratio": None}])
    engine.dispose()


def _arrow(url: str, loader: type | None, **kwargs) -> pa.Table:
    return pa.concat_tables(list(sql_table(credentials=url, table="typed", backend="pyarrow", chunk_size=4,
                                           table_loader_class=loader, **kwargs)))


@pytest.fixture(params=["sqlite", "postgresql"])
def typed_url(request, tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'typed.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    _typed_table(url)
    return url


def test_cursor_loader_matches_dlts_loader_types_values_and_nulls(typed_url):
    ours, dlts = _arrow(typed_url, CursorArrowLoader), _arrow(typed_url, None)
    assert ours.schema == dlts.schema
    assert ours.equals(dlts)
    assert ours.num_rows == 10
    first = ours.sort_by("id").slice(0, 1).to_pylist()[0]
    assert first["day"] == date(2025, 2, 1) and first["price"] == Decimal("0.25") and first["ok"] is True
    assert isinstance(first["at"], datetime)


def test_cursor_loader_applies_the_incremental_filter_with_bound_parameters(typed_url):
    since = dlt.sources.incremental("id", initial_value=5)
    ours = _arrow(typed_url, CursorArrowLoader, incremental=since)
    assert sorted(ours.column("id").to_pylist()) == [5, 6, 7, 8, 99]
