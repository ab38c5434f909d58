"""Runs of one connector on different working folders (gateways or Prefect workers on several hosts, each with its
own var/) that load into one destination: rows land once. Real dlt loads into a real DuckDB file."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import duckdb
import pytest

from connectors.pipeline import ConnectorPipeline, Workspace, run_connector
from connectors.spec import ConnectorSpec


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, updated_at TEXT NOT NULL)")
        con.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"2025-01-{i:02d}") for i in range(1, 11)])
    return db


@pytest.fixture
def spec(shop: Path, tmp_path: Path) -> ConnectorSpec:
    return ConnectorSpec.model_validate({
        "id": "orders_inc", "dataset": "shop",
        "source": {"kind": "sql_database", "url": f"sqlite:///{shop}", "tables": ["orders"],
                   "incremental": {"cursor": "updated_at", "initial_value": "2024-12-31"}},
        "destination": {"kind": "duckdb", "path": str(tmp_path / "shared.duckdb")}, "write_disposition": "append"})


def folder(tmp_path: Path, name: str) -> Workspace:
    return Workspace(tmp_path / name / "dlt", tmp_path / name / "duckdb")


def rows_and_ids(spec: ConnectorSpec) -> tuple[int, int]:
    with duckdb.connect(spec.destination.path, read_only=True) as con:
        return con.execute("SELECT count(*), count(DISTINCT id) FROM shop.orders").fetchone()


def add_orders(shop: Path, ids: range) -> None:
    with sqlite3.connect(shop) as con:
        con.executemany("INSERT INTO orders VALUES (?, ?)", [(i, f"2025-02-{i - 10:02d}") for i in ids])


def test_a_folder_that_loaded_before_another_takes_the_newer_cursor_from_the_destination(spec, shop, tmp_path):
    """Was: a run on a folder whose host "ran last" (by host clocks, or missing a run that left no row, such as a
    Prefect workflow's connector node) skipped the destination's state and loaded from its stale cursor."""
    a, b = folder(tmp_path, "a"), folder(tmp_path, "b")
    assert run_connector(spec, a).rows == {"orders": 10}
    add_orders(shop, range(11, 16))
    assert run_connector(spec, b).rows == {"orders": 5}
    add_orders(shop, range(16, 21))
    assert run_connector(spec, a).rows == {"orders": 5}
    assert rows_and_ids(spec) == (20, 20)


def test_a_package_left_by_a_killed_run_is_not_replayed_after_another_folder_loaded_its_rows(spec, tmp_path):
    a, b = folder(tmp_path, "a"), folder(tmp_path, "b")
    killed = ConnectorPipeline(spec, a)
    for step in ("recover", "extract", "normalize"):  # run 1 on A, killed before its load: its package stays
        killed.run_step(step)
    assert run_connector(spec, b).rows == {"orders": 10}  # run 2 on B loads the same rows
    run_connector(spec, a)  # run 3 back on A: the destination's state is newer than A's package
    assert rows_and_ids(spec) == (10, 10)


def test_a_package_left_by_a_killed_run_is_still_loaded_by_the_next_run_on_its_own_folder(spec, tmp_path):
    a = folder(tmp_path, "a")
    killed = ConnectorPipeline(spec, a)
    for step in ("recover", "extract", "normalize"):
        killed.run_step(step)
    run_connector(spec, a)
    assert rows_and_ids(spec) == (10, 10)
