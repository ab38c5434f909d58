"""Conflict policies: what a trigger does when its connector already has a queued or running run, decided in the
trigger's own transaction on both databases (many triggers at once, two gateways on one PostgreSQL)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app import create_app
from app.runs.store import NewRun, RunStore
from tests.support.gunicorn_server import GunicornServer
from tests.support.races import race

pytestmark = pytest.mark.long(seconds=40)


def ids(client) -> list[str]:
    return [run["run_id"] for run in client.get("/api/v1/runs").json["items"]]


def test_join_answers_with_the_active_run_and_starts_none(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    joined = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "join"})
    assert joined.status_code == 202 and joined.json["run_id"] == first["run_id"]
    assert ids(client) == [first["run_id"]]
    other = client.post("/trigger", json={"connector_id": "numbers", "on_conflict": "join"})  # another target
    assert other.status_code == 202 and other.json["run_id"] != first["run_id"]


def test_skip_answers_200_saying_nothing_was_started(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    skipped = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "skip"})
    assert skipped.status_code == 200 and skipped.json["skipped"] is True
    assert skipped.json["active_run_id"] == first["run_id"] and "nothing was started" in skipped.json["detail"]
    assert skipped.json["active_run_url"] == first["status_url"]
    assert ids(client) == [first["run_id"]]


def test_reject_is_a_409_naming_the_active_run(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    rejected = client.post("/api/v1/connectors/shop/runs", json={"on_conflict": "reject"})
    assert rejected.status_code == 409 and rejected.json["code"] == "run_active"
    assert rejected.json["run_id"] == first["run_id"] and first["run_id"] in rejected.json["detail"]
    assert ids(client) == [first["run_id"]]


def test_queue_one_keeps_one_queued_behind_the_running_run(app, client):
    store = app.extensions["flowgate"].store
    running = client.post("/trigger", json={"connector_id": "shop"}).json
    assert store.claim_next("executor-a", lease_seconds=600).id == running["run_id"]
    queued = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "queue_one"}).json
    assert queued["run_id"] != running["run_id"] and queued["status"] == "queued"
    for _ in range(3):
        again = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "queue_one"}).json
        assert again["run_id"] == queued["run_id"]
    assert sorted(ids(client)) == sorted([running["run_id"], queued["run_id"]])


def test_a_connectors_own_policy_applies_unless_the_trigger_says_otherwise(app_config, workdir: Path):
    with (workdir / "connectors.yaml").open("a") as yaml:
        yaml.write("  once:\n    source: {kind: python, ref: \"connectors.demo:numbers\", args: {n: 1}}\n"
                   "    on_conflict: reject\n")
    app = create_app(app_config)
    try:
        client = app.test_client()
        first = client.post("/trigger", json={"connector_id": "once"})
        assert first.status_code == 202
        assert client.post("/trigger", json={"connector_id": "once"}).status_code == 409
        queued = client.post("/trigger", json={"connector_id": "once", "on_conflict": "queue"})
        assert queued.status_code == 202 and queued.json["run_id"] != first.json["run_id"]
    finally:
        app.extensions["flowgate"].store.dispose()


def test_a_join_held_between_its_read_and_its_insert_is_joined_by_the_next(store: RunStore):
    """The first trigger has read "no active run" and is about to insert; the second must not read the same."""
    new = NewRun(kind="connector", target="shop", params={}, backend="local", concurrency_key="k", on_conflict="join")
    outcome = race(store, held=lambda: store.create_run(new), other=lambda: store.create_run(new), verb="INSERT INTO")
    assert not outcome.other_ended_first  # it waited for the first's transaction
    (first, created), (second, created_again) = outcome.held, outcome.other
    assert created and not created_again and second.id == first.id
    assert [run.id for run in store.list()] == [first.id]


def test_thirty_concurrent_joins_make_one_run_on_sqlite(app):
    def trigger(_: int) -> str:
        answer = app.test_client().post("/trigger", json={"connector_id": "shop", "on_conflict": "join"})
        assert answer.status_code == 202, answer.json
        return answer.json["run_id"]

    with ThreadPoolExecutor(30) as pool:
        run_ids = set(pool.map(trigger, range(30)))
    assert len(run_ids) == 1 and ids(app.test_client()) == list(run_ids)


def test_thirty_concurrent_joins_across_two_gateways_on_postgresql_make_one_run(workdir: Path, postgres_url: str):
    env = {"DATABASE_URL": postgres_url, "FLOWGATE_EXECUTOR_THREADS": "0"}  # the run stays queued: all must join
    gateways = [GunicornServer(workdir, workers=2, ready_path="/health", **env) for _ in range(2)]
    try:
        for gateway in gateways:
            gateway.start()

        def trigger(i: int) -> str:
            answer = httpx.post(f"{gateways[i % 2].url}/trigger", json={"connector_id": "shop", "on_conflict": "join"},
                                timeout=60)
            assert answer.status_code == 202, answer.text
            return answer.json()["run_id"]

        with ThreadPoolExecutor(30) as pool:
            run_ids = set(pool.map(trigger, range(30)))
        assert len(run_ids) == 1
        listed = httpx.get(f"{gateways[1].url}/api/v1/runs", timeout=30).json()["items"]
        assert [run["run_id"] for run in listed] == list(run_ids)
    finally:
        for gateway in gateways:
            gateway.kill()


# --- workflows: the same policies, per execute and in the workflow file ----------------------------------------

SLOW = "nodes:\n  - {id: wait, type: delay, config: {seconds: 30}}\n"


@pytest.fixture
def app_config(app_config: dict) -> dict:
    folder = app_config["workflows_dir"]
    folder.mkdir()
    (folder / "slow.yaml").write_text(SLOW)
    (folder / "once.yaml").write_text(SLOW + "on_conflict: reject\n")
    return app_config


def executions(client) -> list[str]:
    return [run["run_id"] for run in client.get("/api/v1/runs", query_string={"connector_id": "slow"}).json["items"]]


def test_an_execute_with_join_answers_with_the_active_execution(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    joined = client.post("/api/workflow/slow/execute", json={"on_conflict": "join"})
    assert joined.status_code == 202 and joined.json["executionId"] == first["executionId"]
    assert joined.json["statusUrl"] == first["statusUrl"] and joined.headers["Location"] == first["statusUrl"]
    assert executions(client) == [first["executionId"]]
    # a connector's active run is not a workflow's, whatever their ids
    other = client.post("/api/workflow/once/execute", json={"on_conflict": "join"})
    assert other.status_code == 202 and other.json["executionId"] != first["executionId"]


def test_an_execute_with_skip_answers_200_saying_nothing_was_started(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    skipped = client.post("/api/workflow/slow/execute", json={"on_conflict": "skip"})
    assert skipped.status_code == 200 and skipped.json["skipped"] is True and skipped.json["success"] is True
    assert skipped.json["activeExecutionId"] == first["executionId"] and skipped.json["statusUrl"] == first["statusUrl"]
    assert "nothing was started" in skipped.json["message"] and "executionId" not in skipped.json
    assert executions(client) == [first["executionId"]]


def test_an_execute_with_reject_is_a_409_naming_the_active_execution(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    rejected = client.post("/api/workflow/slow/execute", json={"on_conflict": "reject"})
    assert rejected.status_code == 409 and rejected.json["code"] == "run_active"
    assert rejected.json["run_id"] == first["executionId"] and first["executionId"] in rejected.json["detail"]
    assert rejected.headers["Content-Type"] == "application/problem+json"
    assert executions(client) == [first["executionId"]]


def test_an_execute_with_queue_one_keeps_one_queued_behind_the_running_execution(app, client):
    store = app.extensions["flowgate"].store
    running = client.post("/api/workflow/slow/execute", json={}).json["executionId"]
    assert store.claim_next("executor-a", lease_seconds=600).id == running
    queued = client.post("/api/workflow/slow/execute", json={"on_conflict": "queue_one"}).json
    assert queued["executionId"] != running and queued["status"] == "queued"
    for _ in range(3):
        again = client.post("/api/workflow/slow/execute", json={"on_conflict": "queue_one"}).json
        assert again["executionId"] == queued["executionId"]
    assert sorted(executions(client)) == sorted([running, queued["executionId"]])


def test_a_workflow_files_own_policy_applies_unless_the_execute_says_otherwise(client):
    first = client.post("/api/workflow/once/execute", json={})
    assert first.status_code == 202
    assert client.post("/api/workflow/once/execute", json={}).status_code == 409
    queued = client.post("/api/workflow/once/execute", json={"on_conflict": "queue"})
    assert queued.status_code == 202 and queued.json["executionId"] != first.json["executionId"]
    # an inline definition's own policy applies to the runs under its id as a file's does
    inline = {"nodes": [{"id": "wait", "type": "delay", "config": {"seconds": 30}}], "on_conflict": "join"}
    started = client.post("/api/workflow/adhoc/execute", json={"workflow": inline}).json["executionId"]
    assert client.post("/api/workflow/adhoc/execute", json={"workflow": inline}).json["executionId"] == started


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_thirty_concurrent_executes_with_join_across_two_gateways_make_one_run(request, workdir: Path, database):
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "slow.yaml").write_text(SLOW)
    env = {"FLOWGATE_EXECUTOR_THREADS": "0"}  # the run stays queued: all must join
    if database == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    gateways = [GunicornServer(workdir, workers=2, ready_path="/health", **env) for _ in range(2)]
    try:
        for gateway in gateways:
            gateway.start()

        def execute(i: int) -> str:
            answer = httpx.post(f"{gateways[i % 2].url}/api/workflow/slow/execute", json={"on_conflict": "join"},
                                timeout=60)
            assert answer.status_code == 202, answer.text
            return answer.json()["executionId"]

        with ThreadPoolExecutor(30) as pool:
            run_ids = set(pool.map(execute, range(30)))
        assert len(run_ids) == 1
        listed = httpx.get(f"{gateways[1].url}/api/v1/runs", timeout=30).json()["items"]
        assert [run["run_id"] for run in listed] == list(run_ids)
    finally:
        for gateway in gateways:
            gateway.kill()
