"""The offline demo: a small shop database generator and a python source for examples and benchmarks.

`python -m connectors.demo` writes data/demo_shop.db (deterministic, a few hundred kB).
"""
from __future__ import annotations

import random
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import dlt

DEFAULT_SHOP_DB = Path(__file__).resolve().parent.parent / "data" / "demo_shop.db"


@dlt.resource(name="numbers", write_disposition="append")
def numbers(n: int = 100, delay_seconds: float = 0.0) -> Iterator[list[dict[str, int]]]:
    """`n` rows of squares; sleeps `delay_seconds` first, to stand in for a slow source."""
    if delay_seconds:
        time.sleep(delay_seconds)
    # In pages: `n` comes from a trigger's params, and one list of a huge `n` would take all the memory there is
    # (a preview reads the first page only).
    for start in range(0, n, 10_000):
        yield [{"n": i, "square": i * i} for i in range(start, min(start + 10_000, n))]


def build_shop_db(path: Path = DEFAULT_SHOP_DB, customers: int = 200, orders: int = 2000) -> Path:
    """Create (or recreate) the demo shop SQLite database at `path`; the same rows every time."""
    rng = random.Random(42)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as con:
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "email TEXT NOT NULL, country TEXT NOT NULL, created_on DATE NOT NULL)")
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL "
                    "REFERENCES customers(id), ordered_on DATE NOT NULL, status TEXT NOT NULL, "
                    "amount_cents INTEGER NOT NULL)")
        countries = ["DE", "FR", "NL", "US", "GB", "ES"]
        start = date(2025, 1, 1)
        con.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", [
            (i, f"Customer {i}", f"customer{i}@example.com", rng.choice(countries),
             (start + timedelta(days=rng.randrange(300))).isoformat())
            for i in range(1, customers + 1)])
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", [
            (i, rng.randrange(1, customers + 1), (start + timedelta(days=rng.randrange(600))).isoformat(),
             rng.choice(["paid", "shipped", "refunded"]), rng.randrange(500, 50_000))
            for i in range(1, orders + 1)])
    con.close()
    tmp.replace(path)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SHOP_DB
    print(f"wrote {build_shop_db(target)}")
