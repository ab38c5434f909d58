"""The Prefect flows' connector work below the Prefect tier: the functions the flows run, called here with a real
run store and ConnectorLock, and each step's Prefect task as its plain function (tests/test_prefect.py runs the
same code as real flow runs)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

from app.runs.store import NewRun, RunStore
from connectors.isolated import run_connector_isolated
from connectors.pipeline import Workspace, duckdb_path
from connectors.spec import ConnectorSpec
from flows.connector_lock import ConnectorLock, LockLost
from flows.nodes import NodeFailed
from flows.prefect import connector_flow
from flows.prefect.workflow_flow import connector_runner, not_as_accepted, workflow_flow
from flows.runtime import RuntimeSettings
from tests.support.fake_services import EchoService

SLOW = {"id": "slow", "dataset": "raw",  # its extract takes 20 s: the step the lease is lost in
        "source": {"kind": "python", "ref": "connectors.demo:numbers", "args": {"n": 5, "delay_seconds": 20}}}
LEASE_SECONDS = 1.5  # fenced a second after the last renewal that got through: the step must end soon after


@pytest.fixture(scope="module", autouse=True)
def _forkserver_ready(tmp_path_factory) -> None:
    """The forkserver up and its imports done (seconds on a loaded machine), so the times below are the kill's."""
    folder = tmp_path_factory.mktemp("warm")
    spec = ConnectorSpec.model_validate({**SLOW, "source": {**SLOW["source"], "args": {"n": 1}}})
    run_connector_isolated(spec, Workspace(folder / "dlt", folder / "duckdb"), steps=("recover",))


@pytest.fixture
def stalled_lock(store: RunStore):
    """A connector lock whose renewals hang from the first one on (a database that stopped answering); its
    `stalled_at` is when the first one was sent (the lease is lost a third of a lease later)."""
    lock = ConnectorLock(store.db, lease_seconds=LEASE_SECONDS)
    released = threading.Event()

    def renew(key: str, holder: str) -> bool:
        lock.stalled_at = getattr(lock, "stalled_at", None) or time.monotonic()
        return released.wait(60) and False

    lock.renew = renew
    yield lock
    released.set()


def test_a_flow_run_that_loses_its_connectors_key_mid_step_has_the_steps_process_killed_at_once(
        stalled_lock: ConnectorLock, tmp_path: Path):
    """A local run may take the key as soon as the lease lapses: the flow's step must not go on beside it (it
    did: the lease was looked at between steps only, so the step in progress ran to its end)."""
    spec = ConnectorSpec.model_validate(SLOW)
    workspace = Workspace(tmp_path / "dlt", tmp_path / "duckdb")
    with pytest.raises(LockLost, match="was lost during"):  # extract, or recover on a slow machine
        with stalled_lock.hold("connector:slow", "prefect:flow-run-1:abcd") as lost:
            connector_flow.run_steps(spec, workspace, lost, run_step=connector_flow.pipeline_step.fn)
    took = time.monotonic() - stalled_lock.stalled_at
    assert took < 5, f"the step ran on for {took:.1f} s after the renewals stalled"
    assert not duckdb_path(spec, workspace).exists() or _tables(duckdb_path(spec, workspace)) == []


def test_a_workflows_connector_node_that_loses_its_key_mid_step_is_killed_at_once(
        stalled_lock: ConnectorLock, store: RunStore, tmp_path: Path):
    (tmp_path / "connectors.yaml").write_text(
        "connectors:\n  slow:\n    source: {kind: python, ref: 'connectors.demo:numbers', "
        "args: {n: 5, delay_seconds: 20}}\n    dataset: raw\n")
    settings = RuntimeSettings.of(var_dir=tmp_path / "var", connectors_file=tmp_path / "connectors.yaml")
    run = connector_runner(settings, store.db, "prefect:flow-run-2:run-2", lock=stalled_lock)
    with pytest.raises(NodeFailed) as failed:
        run("slow", {}, lambda: False)
    took = time.monotonic() - stalled_lock.stalled_at
    assert failed.value.code == "cancelled" and took < 5, (failed.value, f"{took:.1f} s after the renewals stalled")


def _tables(path: Path) -> list[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return [row[0] for row in con.execute("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = 'raw'").fetchall()]


def test_the_flows_steps_each_in_a_process_of_its_own_sum_up_to_a_whole_runs_summary(tmp_path: Path):
    """Incremental windows are noted at extract and schema changes against what recover found, each in a process
    of its own on the Prefect path: the summary must still say them (it said neither: test_prefect red)."""
    from connectors.pipeline import run_connector
    from tests.support.incremental import events_db

    events_db(tmp_path / "events.db", [(i, "new", f"2025-01-01T00:00:{i:02d}") for i in range(5)])
    summaries = {}
    for path in ("steps", "whole"):
        spec = ConnectorSpec.model_validate({
            "id": "inc", "dataset": "raw", "destination": {"kind": "duckdb", "path": str(tmp_path / f"{path}.duckdb")},
            "source": {"kind": "sql_database", "url": f"sqlite:///{tmp_path / 'events.db'}", "tables": ["events"],
                       "incremental": {"cursor": "updated_at"}}})
        workspace = Workspace(tmp_path / path / "dlt", tmp_path / path / "duckdb")
        summaries[path] = (connector_flow.run_steps(spec, workspace, threading.Event(),
                                                    run_step=connector_flow.pipeline_step.fn)
                           if path == "steps" else run_connector(spec, workspace))
    steps, whole = (summaries[path].to_dict() for path in ("steps", "whole"))
    assert steps["incremental"]["events"] == whole["incremental"]["events"] == {
        "cursor_path": "updated_at", "from": None, "to": "2025-01-01T00:00:04", "rows": 5}
    assert steps["schema_changes"] == whole["schema_changes"] and "events" in whole["schema_changes"]
    assert (steps["rows"], len(steps["load_ids"]), steps["merge"]) == (whole["rows"], 1, whole["merge"])


GREET = {"id": "greet", "nodes": [{"id": "start", "type": "trigger"},
                                  {"id": "say", "type": "transform", "config": {"value": "hello"}}],
         "connections": [{"from": "start", "to": "say"}]}


def _accepted(store: RunStore, definition: dict, from_file: bool):
    """A workflow run as a gateway stores it for Prefect: what the flow run's parameters must repeat."""
    params = {"inputs": {}, "mode": "optimized", "from_file": from_file, "workflow": definition}
    run, _ = store.create_run(NewRun(kind="workflow", target=definition["id"], params=params, backend="prefect",
                                     concurrency_key=f"workflow-run:{definition['id']}"))
    return run, {**params, "reuse": None}


def test_a_workflow_flow_run_executes_only_the_definition_the_gateway_accepted(tmp_path: Path):
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_schema()
    try:
        run, given = _accepted(store, GREET, from_file=True)
        assert not_as_accepted(store.db, run.id, given) is None
        say_x = {"id": "say", "type": "transform", "config": {"value": "${X}"}}
        other = {**GREET, "nodes": [*GREET["nodes"][:1], say_x]}
        assert "workflow" in not_as_accepted(store.db, run.id, {**given, "workflow": other})
        inline, inline_given = _accepted(store, GREET, from_file=False)
        assert "from_file" in not_as_accepted(store.db, inline.id, {**inline_given, "from_file": True})
        assert "inputs" in not_as_accepted(store.db, run.id, {**given, "inputs": {"x": 1}})
        connector_run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                                   concurrency_key="connector:numbers"))
        assert "has no workflow run" in not_as_accepted(store.db, connector_run.id, given)
    finally:
        store.dispose()


def test_a_definition_sent_straight_to_prefect_never_reads_the_workers_environment(tmp_path: Path, monkeypatch):
    """Review C1: anyone reaching Prefect's API could run a definition of their own with `from_file: true`, whose
    ${VAR}s the worker filled in from its environment and sent to an allowed host."""
    echo = EchoService()
    store = RunStore(f"sqlite:///{tmp_path / 'runs.db'}")
    store.create_schema()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setenv("FLOWGATE_HTTP_ALLOWED_HOSTS", f"127.0.0.1:{echo.port}")
    monkeypatch.setenv("WORKER_SECRET", "s3cr3t-of-the-worker")
    try:
        run, given = _accepted(store, GREET, from_file=True)  # an active run, whose id Prefect's API shows
        stealing = {"id": "greet", "nodes": [{"id": "leak", "type": "http",
                                              "config": {"url": f"{echo.url}/items/1?k=${{WORKER_SECRET}}"}}]}
        state = workflow_flow.fn(run.id, stealing, {}, "optimized", True, None)
        assert state.type.value == "CANCELLED" and "not what the gateway accepted" in state.message
    finally:
        store.dispose()
        echo.stop()
    assert echo.requests == []
