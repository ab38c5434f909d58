"""Benchmark: SQLite -> DuckDB, three ways in one run, each in its own process (for a clean peak RSS).

- flowgate: a sql_database connector with flowgate's defaults (dlt, pyarrow backend);
- dlt defaults: dlt's sql_database source as it comes (SQLAlchemy backend);
- hand-written limit: sqlite3 fetchmany -> Arrow table -> DuckDB insert, streamed in chunks, no dlt.

    .venv/bin/python -m bench.sql_throughput [--rows 1000000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 100_000


def make_source(path: Path, rows: int) -> None:
    """orders(id, customer_id, amount_cents, status, ordered_on): `rows` deterministic rows."""
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
                    "amount_cents INTEGER NOT NULL, status TEXT NOT NULL, ordered_on TEXT NOT NULL)")
        statuses = ("paid", "shipped", "refunded")
        for start in range(0, rows, CHUNK):
            con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", (
                (i, i % 9973, (i * 37) % 50_000, statuses[i % 3], f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}")
                for i in range(start, min(start + CHUNK, rows))))


def run_flowgate(db: Path, out: Path) -> int:
    from connectors.pipeline import Workspace, run_connector
    from connectors.spec import ConnectorSpec

    spec = ConnectorSpec.model_validate({"id": "bench", "source": {"kind": "sql_database", "url": f"sqlite:///{db}",
                                                                   "tables": ["orders"]},
                                         "write_disposition": "replace"})
    summary = run_connector(spec, Workspace(out / "dlt", out / "duckdb"))
    return summary.rows["orders"]


def run_dlt_defaults(db: Path, out: Path) -> int:
    import os

    import dlt
    from dlt.sources.sql_database import sql_database

    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    pipeline = dlt.pipeline("bench_dlt", pipelines_dir=str(out / "dlt"),
                            destination=dlt.destinations.duckdb(str(out / "dlt.duckdb")), dataset_name="raw")
    pipeline.run(sql_database(credentials=f"sqlite:///{db}", table_names=["orders"]), write_disposition="replace")
    return pipeline.last_trace.last_normalize_info.row_counts["orders"]


def run_hand_written(db: Path, out: Path) -> int:
    import duckdb
    import pyarrow as pa

    total = 0
    with sqlite3.connect(db) as source, duckdb.connect(str(out / "hand.duckdb")) as target:
        cursor = source.execute("SELECT id, customer_id, amount_cents, status, ordered_on FROM orders")
        names = [d[0] for d in cursor.description]
        target.execute("CREATE TABLE orders (id BIGINT, customer_id BIGINT, amount_cents BIGINT, status VARCHAR, "
                       "ordered_on VARCHAR)")
        while rows := cursor.fetchmany(CHUNK):
            batch = pa.Table.from_arrays(  # noqa: F841 (DuckDB reads it by name: FROM batch)
                [pa.array(column) for column in zip(*rows)], names=names)
            target.execute("INSERT INTO orders SELECT * FROM batch")
            total += len(rows)
    return total


METHODS = {"flowgate": run_flowgate, "dlt-defaults": run_dlt_defaults, "hand-written": run_hand_written}
# What each way imports, done before its clock starts: a gateway process pays it once, not per run.
IMPORTS = {"flowgate": ("dlt", "dlt.sources.sql_database", "connectors.pipeline", "connectors.cursor_loader"),
           "dlt-defaults": ("dlt", "dlt.sources.sql_database"), "hand-written": ("duckdb", "pyarrow")}


def measure(method: str, db: Path, out: Path) -> dict:
    """Run one method in a fresh process; its rows, seconds and peak RSS."""
    done = subprocess.run([sys.executable, "-m", "bench.sql_throughput", "--child", method, str(db), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dlt-rows", type=int, default=200_000,
                        help="rows for dlt's defaults, which took 5.2 GB of RSS for 200k rows here: "
                             "1M would not fit this machine's memory")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each way; the median is kept")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "DB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, db, out = args.child
        started = time.perf_counter()
        for module in IMPORTS[method]:
            importlib.import_module(module)
        import_seconds = time.perf_counter() - started
        started = time.perf_counter()
        rows = METHODS[method](Path(db), Path(out))
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"rows": rows, "seconds": seconds, "import_seconds": import_seconds, "peak_rss_mb": peak_mb}))
        return

    with tempfile.TemporaryDirectory(prefix="flowgate-sql-bench-") as tmp:
        sizes = {method: args.dlt_rows if method == "dlt-defaults" else args.rows for method in METHODS}
        samples: dict[str, list[dict]] = {method: [] for method in METHODS}
        # Interleaved repeats, median kept: this machine is shared and one sample can be off by 30%.
        for attempt in range(args.repeat):
            for method, rows in sizes.items():
                if method == "dlt-defaults" and attempt:
                    continue  # 40 s a time; once is enough to show the gap
                db = Path(tmp) / f"source-{rows}.db"
                if not db.exists():
                    make_source(db, rows)
                out = Path(tmp) / f"{method}-{attempt}"
                out.mkdir()
                sample = measure(method, db, out)
                assert sample["rows"] == rows, sample
                samples[method].append(sample)
        results = {method: sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] for method, runs in samples.items()}

    rate = {method: r["rows"] / r["seconds"] for method, r in results.items()}
    print(f"\nSQLite -> DuckDB, each way in a fresh process, median of {args.repeat} interleaved runs "
          "(dlt's defaults: one run); seconds exclude imports, ratios compare rows per second")
    print(f"{'method':14} {'rows':>10} {'seconds':>8} {'rows/s':>11} {'peak RSS':>9} {'imports':>8} "
          f"{'time vs hand-written':>21}")
    for method, r in results.items():
        print(f"{method:14} {r['rows']:10,} {r['seconds']:8.2f} {rate[method]:11,.0f} {r['peak_rss_mb']:7.0f}MB "
              f"{r['import_seconds']:7.2f}s {rate['hand-written'] / rate[method]:20.2f}x")
    print(f"\nflowgate: {rate['flowgate'] / rate['dlt-defaults']:.1f}x the rows/s of dlt's defaults, "
          f"{rate['hand-written'] / rate['flowgate']:.2f}x the hand-written limit's time per row")


if __name__ == "__main__":
    main()
