"""The run store's migrations: from an empty database and from the schema create_all made before them (with runs
in it), on SQLite and PostgreSQL; several processes starting at once on a fresh PostgreSQL database."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.runs import migrate
from app.runs.store import NewRun, RunStore
from flows.database import Database
from flows.node_cache import SqlNodeCache
from flows.node_cache import metadata as node_cache_metadata
from tests.support.gunicorn_server import ROOT

DATA = Path(__file__).parent / "support" / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """An empty database on each dialect the store supports."""
    return f"sqlite:///{tmp_path / 'runs.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def schema_differences(database: Database) -> list:
    """What autogenerate would change to make the database match the models (empty when they agree)."""
    combined = sa.MetaData()
    for metadata in migrate.target_metadata():
        for table in metadata.sorted_tables:
            table.to_metadata(combined)
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, combined)


def index_names(database: Database, table: str) -> set[str]:
    with database.engine.connect() as connection:
        return {index["name"] for index in sa.inspect(connection).get_indexes(table)}


def load_previous_schema(database: Database) -> None:
    """The tables and indexes exactly as create_all made them before migrations (DDL saved from that commit)."""
    dialect = "sqlite" if database.is_sqlite else "postgresql"
    script = (DATA / f"schema_v0_{dialect}.sql").read_text()
    statements = [part.strip() for part in script.split(";") if part.strip() and not part.strip().startswith("--")]
    with database.writer.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql("\n".join(line for line in statement.splitlines() if not line.startswith("--")))


def test_head_is_the_newest_migration():
    assert ScriptDirectory(str(migrate.MIGRATIONS)).get_current_head() == migrate.HEAD


def test_upgrading_an_empty_database_makes_exactly_the_models_tables(database_url: str):
    database = Database(database_url)
    try:
        assert migrate.current_revision(database) is None
        migrate.upgrade(database)
        assert migrate.current_revision(database) == migrate.HEAD
        assert schema_differences(database) == []
        migrate.upgrade(database)  # a second start finds nothing to do
        assert migrate.current_revision(database) == migrate.HEAD
    finally:
        database.dispose()


def test_upgrading_the_previous_schema_keeps_every_run_and_its_parts(database_url: str):
    database = Database(database_url)
    load_previous_schema(database)
    old = datetime(2024, 1, 2, 3, 4, 5)
    fingerprint = NewRun(kind="connector", target="shop", params={"n": 1}, backend="local",
                         concurrency_key="k").request_hash
    with database.writer.begin() as connection:
        for i in range(3):
            connection.execute(sa.text(
                "INSERT INTO runs (id, kind, target, params, status, backend, idempotency_key, request_hash, "
                "concurrency_key, cancel_requested, attempts, created_at, finished_at, result) VALUES "
                "(:id, 'connector', 'shop', '{\"n\": 1}', 'completed', 'local', :key, :hash, 'k', false, 1, :at, :at, "
                "'{\"rows\": {\"orders\": 100}}')"), {"id": f"run{i}", "key": f"key{i}", "hash": fingerprint,
                                  "at": old + timedelta(minutes=i)})
        connection.execute(sa.text("INSERT INTO run_callbacks (run_id, url, status, attempts, next_attempt_at) "
                                   "VALUES ('run0', 'https://example.com/hook', 'delivered', '[]', :at)"), {"at": old})
        connection.execute(sa.text("INSERT INTO run_logs (run_id, at, level, logger, message) "
                                   "VALUES ('run0', :at, 'INFO', 'x', 'loaded 100 rows')"), {"at": old})
        connection.execute(sa.text("INSERT INTO run_nodes (run_id, node_id, position, status, data, updated_at) "
                                   "VALUES ('run1', 'a', 0, 'completed', '{\"id\": \"a\"}', :at)"), {"at": old})
    assert migrate.current_revision(database) is None
    store = RunStore(database_url)
    try:
        store.create_schema()  # what the gateway's start does
        assert migrate.current_revision(store.db) == migrate.HEAD
        assert schema_differences(store.db) == []
        assert {"ix_runs_finished", "ix_runs_target_created"} <= index_names(store.db, "runs")
        assert not {"ix_runs_target", "ix_runs_status"} & index_names(store.db, "runs")
        assert [run.id for run in store.list()] == ["run2", "run1", "run0"]
        run = store.get("run0")
        assert (run.status, run.params, run.result, run.created_at.replace(tzinfo=None)) == (
            "completed", {"n": 1}, {"rows": {"orders": 100}}, old)
        assert run.callback.status == "delivered"
        assert run.joined_count == 0  # no trigger joined a run kept from before the count
        assert [line["message"] for line in store.logs.read("run0")] == ["loaded 100 rows"]
        assert store.nodes.read("run1") == [{"id": "a"}]
        again, created = store.create_run(NewRun(kind="connector", target="shop", params={"n": 1}, backend="local",
                                                 concurrency_key="k", idempotency_key="key1"))
        assert (again.id, created) == ("run1", False)  # the idempotency keys survived too
        fresh, created = store.create_run(NewRun(kind="connector", target="shop", params={}, backend="local",
                                                 concurrency_key="k"))
        assert created and store.claim_next("me", 30).id == fresh.id
    finally:
        store.dispose()
        database.dispose()


def test_a_node_cache_made_first_by_a_prefect_flow_is_adopted(database_url: str):
    database = Database(database_url)
    try:
        database.create_tables(node_cache_metadata)  # what flows/prefect/workflow_flow.py does on its own
        SqlNodeCache(database).put("k", "http", {"ok": True}, 60)
        migrate.upgrade(database)
        assert schema_differences(database) == []
        assert SqlNodeCache(database).get("k") == (True, {"ok": True})
        database.create_tables(node_cache_metadata)  # and the flow keeps working on a migrated database
        SqlNodeCache(database).put("k2", "http", 1, 60)
    finally:
        database.dispose()


def test_downgrade_to_the_baseline_and_up_again(database_url: str):
    database = Database(database_url)
    try:
        migrate.upgrade(database)
        migrate.downgrade(database, migrate.BASELINE)
        assert {"ix_runs_target", "ix_runs_status"} <= index_names(database, "runs")
        migrate.upgrade(database)
        assert schema_differences(database) == []
    finally:
        database.dispose()


def test_the_command_line_upgrades_the_database_in_database_url(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": url, "FLOWGATE_VAR_DIR": str(tmp_path / "var")}
    done = subprocess.run([sys.executable, "-m", "app", "store", "upgrade"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"run store at revision {migrate.HEAD}"
    done = subprocess.run([sys.executable, "-m", "app", "store", "current"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == migrate.HEAD


def _start_gateway(config: dict, start_at: float, results) -> None:
    """One gateway process's start, at `start_at` on the wall clock (a forked child)."""
    from app import create_app

    time.sleep(max(start_at - time.time(), 0))
    try:
        app = create_app(config)
        app.extensions["flowgate"].store.dispose()
        results.put("up")
    except Exception as exc:  # the failure is the result this test reports
        results.put(f"{type(exc).__name__}: {exc}".splitlines()[0])


def test_two_gateways_started_in_the_same_second_on_a_fresh_postgres_database_both_come_up(
        postgres_url: str, app_config: dict):
    from tests.support.prefect_stack import POSTGRES_ADMIN_URL, fresh_postgres_database

    context = multiprocessing.get_context("fork")
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        for round_ in range(10):
            name = f"flowgate_start_{uuid.uuid4().hex[:8]}"
            url = sa.engine.make_url(fresh_postgres_database(name)).set(drivername="postgresql+psycopg")
            results = context.Queue()
            config = {**app_config, "database_url": url.render_as_string(hide_password=False)}
            start_at = time.time() + 0.5
            gateways = [context.Process(target=_start_gateway, args=(config, start_at, results)) for _ in range(2)]
            for gateway in gateways:
                gateway.start()
            outcomes = sorted(results.get(timeout=60) for _ in gateways)
            for gateway in gateways:
                gateway.join(30)
            assert outcomes == ["up", "up"], f"round {round_}: {outcomes}"
            database = Database(url.render_as_string(hide_password=False))
            assert migrate.current_revision(database) == migrate.HEAD
            database.dispose()
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    finally:
        admin.dispose()
