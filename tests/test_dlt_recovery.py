"""flowgate_duckdb and its marks: dlt extended by subclassing, its own classes left as dlt defines them.
(Killed runs whose committed job must not load twice: tests/test_faults.py, "committed".)"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry
from tests.support.gunicorn_server import ROOT

DLTS_OWN_RUN = """
import json, sys
from pathlib import Path
from dlt.destinations.impl.duckdb.duck import DuckDbCopyJob
from dlt.destinations.insert_job_client import InsertValuesLoadJob

jobs = (DuckDbCopyJob, InsertValuesLoadJob)
dlts = [job.__dict__["run"] for job in jobs]  # taken before any module of flowgate's is imported
before = sorted(m for m in sys.modules if m.split(".")[0] in ("connectors", "flows", "app"))
from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry
registry = ConnectorRegistry.load(Path(sys.argv[1]))
workspace = Workspace(Path(sys.argv[2]), Path(sys.argv[3]))
rows = {name: run_connector(registry.get(name), workspace).rows for name in ("shop", "numbers")}
print(json.dumps({"flowgate_imported_before": before, "rows": rows,
                  "dlts_own": [job.__dict__["run"] is run for job, run in zip(jobs, dlts)],
                  "named": [f"{run.__module__}:{run.__qualname__}" for run in dlts]}))
"""


@pytest.fixture
def workspace(workdir: Path) -> Workspace:
    return Workspace(pipelines_dir=workdir / "var" / "dlt", duckdb_dir=workdir / "var" / "duckdb")


def marks_and_index(path: str, dataset: str) -> tuple[set[tuple[str, str]], list[str]]:
    with duckdb.connect(path, read_only=True) as con:
        marks = set(con.execute(f"SELECT load_id, job_id FROM {dataset}._flowgate_loaded_jobs").fetchall())
        index = con.execute("SELECT index_name FROM duckdb_indexes() WHERE schema_name = ? AND is_unique "
                            "AND table_name = '_flowgate_loaded_jobs'", [dataset]).fetchall()
    return marks, [name for (name,) in index]


def test_a_real_run_into_duckdb_leaves_dlts_load_jobs_as_dlt_defined_them(workdir: Path, workspace: Workspace):
    """A fresh interpreter takes dlt's two `run` functions before flowgate is imported, then runs a Parquet copy
    job (shop) and an INSERT VALUES job (numbers) through flowgate's pipeline: dlt's classes are unchanged."""
    done = subprocess.run([sys.executable, "-c", DLTS_OWN_RUN, str(workdir / "connectors.yaml"),
                           str(workspace.pipelines_dir), str(workspace.duckdb_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["flowgate_imported_before"] == []
    assert seen["rows"] == {"shop": {"orders": 100, "customers": 20}, "numbers": {"numbers": 10}}
    assert seen["dlts_own"] == [True, True]
    assert seen["named"] == ["dlt.destinations.impl.duckdb.duck:DuckDbCopyJob.run",
                             "dlt.destinations.insert_job_client:InsertValuesLoadJob.run"]
    # ...and the loads did go through flowgate's destination: its marks table is there, with its key.
    assert marks_and_index(str(workspace.duckdb_dir / "shop.duckdb"), "shop_raw")[1] == ["_flowgate_loaded_jobs_key"]


def test_a_marks_table_from_before_the_key_gets_it_and_a_completed_load_prunes_marks(workdir, workspace):
    """Marks go when their load completes, or once 30 days old; another connector's recent mark in the same
    dataset (a package of its still pending) stays."""
    path = workspace.duckdb_dir / "numbers.duckdb"
    path.parent.mkdir(parents=True)
    others = (f"{time.time() - 3600:.6f}", "numbers.0123456789.insert_values.gz")
    with duckdb.connect(str(path)) as con:  # the table as flowgate created it before, without a key
        con.execute("CREATE SCHEMA raw")
        con.execute("CREATE TABLE raw._flowgate_loaded_jobs (load_id VARCHAR, job_id VARCHAR)")
        con.executemany("INSERT INTO raw._flowgate_loaded_jobs VALUES (?, ?)",
                        [others, (f"{time.time() - 31 * 24 * 3600:.6f}", "numbers.9876543210.insert_values.gz")])

    summary = run_connector(ConnectorRegistry.load(workdir / "connectors.yaml").get("numbers"), workspace)
    assert summary.rows == {"numbers": 10}
    assert marks_and_index(str(path), "raw") == ({others}, ["_flowgate_loaded_jobs_key"])


def test_other_destinations_keep_dlts_own_factory(workdir: Path, workspace: Workspace):
    import dlt

    from connectors.dlt_recovery import flowgate_duckdb
    from connectors.pipeline import _destination
    from connectors.spec import ConnectorSpec

    def destination(**kind: str):
        return _destination(ConnectorSpec(id="c", source={"kind": "python", "ref": "connectors.demo:numbers"},
                                          destination=kind), workspace)

    assert type(destination(kind="duckdb")) is flowgate_duckdb
    motherduck = destination(kind="motherduck", credentials="md:///db?motherduck_token=t")
    assert type(motherduck) is dlt.destinations.motherduck
    assert type(destination(kind="postgres", credentials="postgresql://u:p@localhost/db")) is dlt.destinations.postgres


def test_a_runs_destination_resolves_its_credentials_once_as_dlt_would_and_keeps_dlts_capabilities(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """flowgate_duckdb.for_run: credentials taken from the providers once (a setting in the environment still
    counts), one object every client of the run shares; capabilities as dlt's own DuckDB factory gives them."""
    import dlt
    from dlt.common.normalizers.naming import snake_case, sql_cs_v1

    from connectors.dlt_recovery import flowgate_duckdb

    monkeypatch.setenv("DESTINATION__DUCKDB__CREDENTIALS__SESSION_TIMEZONE", "Europe/Berlin")
    path = str(tmp_path / "x.duckdb")
    destination = flowgate_duckdb.for_run(path, "p")
    dlts = dlt.destinations.duckdb(credentials=path, destination_name="duckdb")
    first, second = (destination.configuration(destination.spec(), accept_partial=True) for _ in range(2))
    assert first.credentials is second.credentials  # and with them, dlt's connection pool
    assert first.credentials.session_timezone == "Europe/Berlin"
    assert first.credentials.database == dlts.configuration(dlts.spec(), accept_partial=True).credentials.database
    for naming in (None, snake_case.NamingConvention(), sql_cs_v1.NamingConvention()):
        for _ in range(2):  # the second from the configuration kept
            assert dict(destination.capabilities(naming=naming)) == dict(dlts.capabilities(naming=naming))


def test_a_load_into_duckdb_opens_the_file_once(workdir: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch):
    """dlt opens the file for the package, for each job and for the completion; the run's one client held open
    makes them share one DuckDB instance (bench/isolation_overhead.py measures what that saves)."""
    from connectors.pipeline import ConnectorPipeline

    spec = ConnectorRegistry.load(workdir / "connectors.yaml").get("shop")
    run_connector(spec, workspace)
    opened: list[str] = []
    connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *args, **kwargs: opened.append(str(args[:1])) or
                        connect(*args, **kwargs))
    pipeline = ConnectorPipeline(spec, workspace)
    for step in ("recover", "extract", "normalize"):
        pipeline.run_step(step)
    opened.clear()
    pipeline.run_step("load")
    assert len(opened) == 1
    assert pipeline.summary().rows == {"orders": 100, "customers": 20}
