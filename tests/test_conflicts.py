"""Conflict policies: what a trigger does when its connector already has a queued or running run, decided in the
trigger's own transaction on both databases (many triggers at once, two gateways on one PostgreSQL)."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from app import create_app
from app.runs.store import NewRun, RunStore
from tests.support.gunicorn_server import GunicornServer
from tests.support.postgres import postgres_schema
from tests.support.problems import assert_problem
from tests.support.races import race
from tests.support.workdir import fill_workdir

pytestmark = pytest.mark.long(seconds=40)


def ids(client) -> list[str]:
    return [run["run_id"] for run in client.get("/api/v1/runs").json["items"]]


def triggers_counted(outcome: str, kind: str = "connector") -> float:
    """flowgate_triggers_total for one outcome of this process's local triggers so far."""
    return REGISTRY.get_sample_value("flowgate_triggers_total",
                                     {"kind": kind, "backend": "local", "outcome": outcome}) or 0.0


def test_join_answers_200_with_the_active_run_marked_joined_and_counts_it(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    assert first["joined_count"] == 0 and "joined" not in first
    joined_before = triggers_counted("joined")
    for count in (1, 2):
        joined = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "join"})
        assert joined.status_code == 200 and joined.json["joined"] is True
        assert joined.json["run_id"] == first["run_id"] and joined.json["joined_count"] == count
        assert joined.headers["Location"] == first["status_url"]
    assert client.get(first["status_url"]).json["joined_count"] == 2
    assert triggers_counted("joined") - joined_before == 2
    assert ids(client) == [first["run_id"]]
    other = client.post("/trigger", json={"connector_id": "numbers", "on_conflict": "join"})  # another target
    assert other.status_code == 202 and other.json["run_id"] != first["run_id"] and "joined" not in other.json


def test_a_retried_trigger_finds_its_run_by_its_key_and_is_no_join(client):
    first = client.post("/trigger", json={"connector_id": "shop"}, headers={"Idempotency-Key": "k-1"}).json
    again = client.post("/trigger", json={"connector_id": "shop"}, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.json["run_id"] == first["run_id"] and "joined" not in again.json
    assert again.json["joined_count"] == 0


def test_a_retried_join_is_answered_with_its_run_again_and_counted_once(client):
    """A caller whose join's answer was lost retries it with the same Idempotency-Key: the same answer, not one more
    join (the key was not kept for a join, so each retry counted again); the key with another body is a 409."""
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    joined_before = triggers_counted("joined")
    for _ in range(3):
        joined = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "join"},
                             headers={"Idempotency-Key": "join-1"})
        assert joined.status_code == 200 and joined.json["joined"] is True, joined.json
        assert joined.json["run_id"] == first["run_id"] and joined.json["joined_count"] == 1
    assert triggers_counted("joined") - joined_before == 1
    other = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "join", "params": {"tables": ["orders"]}},
                        headers={"Idempotency-Key": "join-1"})
    assert_problem(other, 409, "idempotency_key_reused")
    assert client.get(first["status_url"]).json["joined_count"] == 1 and ids(client) == [first["run_id"]]


def test_skip_answers_200_saying_nothing_was_started(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    skipped_before = triggers_counted("skipped")
    skipped = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "skip"})
    assert skipped.status_code == 200 and skipped.json["skipped"] == "already_active"
    assert triggers_counted("skipped") - skipped_before == 1
    assert skipped.json["active_run_id"] == first["run_id"] and "nothing was started" in skipped.json["detail"]
    assert skipped.json["active_run_url"] == first["status_url"]
    assert ids(client) == [first["run_id"]]


def test_reject_is_a_409_naming_the_active_run(client):
    first = client.post("/trigger", json={"connector_id": "shop"}).json
    rejected_before = triggers_counted("rejected")
    rejected = client.post("/api/v1/connectors/shop/runs", json={"on_conflict": "reject"})
    assert_problem(rejected, 409, "run_in_progress")
    assert rejected.json["run_id"] == first["run_id"] and first["run_id"] in rejected.json["detail"]
    assert triggers_counted("rejected") - rejected_before == 1
    assert ids(client) == [first["run_id"]]


def test_queue_one_keeps_one_queued_behind_the_running_run(app, client):
    store = app.extensions["flowgate"].store
    running = client.post("/trigger", json={"connector_id": "shop"}).json
    assert store.claim_next("executor-a", lease_seconds=600).id == running["run_id"]
    queued = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "queue_one"})
    assert queued.status_code == 202 and "joined" not in queued.json  # a new run, answered as any trigger
    queued = queued.json
    assert queued["run_id"] != running["run_id"] and queued["status"] == "queued"
    for count in (1, 2, 3):
        again = client.post("/trigger", json={"connector_id": "shop", "on_conflict": "queue_one"})
        assert again.status_code == 200 and again.json["joined"] is True
        assert again.json["run_id"] == queued["run_id"] and again.json["joined_count"] == count
    assert sorted(ids(client)) == sorted([running["run_id"], queued["run_id"]])
    assert client.get(running["status_url"]).json["joined_count"] == 0


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
    assert second.joined_count == 1 and store.get(first.id).joined_count == 1


def test_thirty_concurrent_joins_make_one_run_on_sqlite(app):
    """The first trigger creates the run, the other 29 join it: joined_count counts the joins, so 29."""
    def trigger(_: int) -> tuple[int, str, bool]:
        answer = app.test_client().post("/trigger", json={"connector_id": "shop", "on_conflict": "join"})
        assert answer.status_code in (200, 202), answer.json
        return answer.status_code, answer.json["run_id"], answer.json.get("joined", False)

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(trigger, range(30)))
    run_ids = {run_id for _, run_id, _ in answers}
    assert len(run_ids) == 1 and ids(app.test_client()) == list(run_ids)
    assert sorted((status, joined) for status, _, joined in answers) == [(200, True)] * 29 + [(202, False)]
    assert app.test_client().get(f"/api/v1/runs/{run_ids.pop()}").json["joined_count"] == 29


def thirty_joins_make_one_run(gateways: list[GunicornServer], path: str, body: dict, id_field: str,
                              target: str) -> None:
    """30 concurrent requests with `join`, spread over the gateways: one makes the run (202), the 29 others are
    answered with it (200, `joined: true`), the run counts 29 joins, and `target` (the connector or workflow the
    requests name) has no other run."""
    def ask(i: int) -> tuple[int, str]:
        answer = httpx.post(f"{gateways[i % 2].url}{path}", json=body, timeout=60)
        assert answer.status_code in (200, 202), answer.text
        assert answer.json().get("joined", False) is (answer.status_code == 200)
        return answer.status_code, answer.json()[id_field]

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(ask, range(30)))
    run_ids = {run_id for _, run_id in answers}
    assert len(run_ids) == 1 and sorted(status for status, _ in answers) == [200] * 29 + [202]
    listed = httpx.get(f"{gateways[1].url}/api/v1/runs", params={"connector_id": target}, timeout=30).json()["items"]
    assert [run["run_id"] for run in listed] == list(run_ids) and listed[0]["joined_count"] == 29


@pytest.fixture(scope="module")
def gateways_on_postgresql(tmp_path_factory) -> Iterator[list[GunicornServer]]:
    """Two gateways (2 workers each) on one PostgreSQL schema, with the shop's connectors and the slow workflow, and
    no executor threads: a run stays queued, so every request with `join` must join it. Shared by the joins tests,
    which name different targets and look only at their own (none stops or reconfigures a gateway)."""
    with postgres_schema() as url:
        workdir = fill_workdir(tmp_path_factory.mktemp("conflicts-postgresql"))
        (workdir / "workflows").mkdir()
        (workdir / "workflows" / "slow.yaml").write_text(SLOW)
        gateways = [GunicornServer(workdir, workers=2, ready_path="/health", DATABASE_URL=url,
                                   FLOWGATE_EXECUTOR_THREADS="0") for _ in range(2)]
        try:
            for gateway in gateways:
                gateway.start()
            yield gateways
        finally:
            for gateway in gateways:
                gateway.kill()


def test_thirty_concurrent_joins_across_two_gateways_on_postgresql_make_one_run(gateways_on_postgresql):
    thirty_joins_make_one_run(gateways_on_postgresql, "/trigger", {"connector_id": "shop", "on_conflict": "join"},
                              "run_id", target="shop")


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


def test_an_execute_with_join_answers_200_with_the_active_execution_marked_joined(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    assert "joined" not in first
    joined_before = triggers_counted("joined", kind="workflow")
    joined = client.post("/api/workflow/slow/execute", json={"on_conflict": "join"})
    assert joined.status_code == 200 and joined.json["joined"] is True and joined.json["success"] is True
    assert joined.json["executionId"] == first["executionId"] and joined.json["status"] == "queued"
    assert joined.json["statusUrl"] == first["statusUrl"] and joined.headers["Location"] == first["statusUrl"]
    assert {"message", "backend"} <= joined.json.keys()
    assert triggers_counted("joined", kind="workflow") - joined_before == 1
    assert client.get(f"/api/v1/runs/{first['executionId']}").json["joined_count"] == 1
    assert executions(client) == [first["executionId"]]
    # a connector's active run is not a workflow's, whatever their ids
    other = client.post("/api/workflow/once/execute", json={"on_conflict": "join"})
    assert other.status_code == 202 and other.json["executionId"] != first["executionId"] and "joined" not in other.json


def test_an_execute_with_skip_answers_200_saying_nothing_was_started(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    skipped = client.post("/api/workflow/slow/execute", json={"on_conflict": "skip"})
    assert skipped.status_code == 200 and skipped.json["skipped"] == "already_active" and skipped.json["success"]
    assert skipped.json["activeExecutionId"] == first["executionId"] and skipped.json["statusUrl"] == first["statusUrl"]
    assert "nothing was started" in skipped.json["message"] and "executionId" not in skipped.json
    assert executions(client) == [first["executionId"]]


def test_an_execute_with_reject_is_a_409_naming_the_active_execution(client):
    first = client.post("/api/workflow/slow/execute", json={}).json
    rejected = client.post("/api/workflow/slow/execute", json={"on_conflict": "reject"})
    assert_problem(rejected, 409, "run_in_progress")
    assert rejected.json["run_id"] == first["executionId"] and first["executionId"] in rejected.json["detail"]
    assert executions(client) == [first["executionId"]]


def test_an_execute_with_queue_one_keeps_one_queued_behind_the_running_execution(app, client):
    store = app.extensions["flowgate"].store
    running = client.post("/api/workflow/slow/execute", json={}).json["executionId"]
    assert store.claim_next("executor-a", lease_seconds=600).id == running
    queued = client.post("/api/workflow/slow/execute", json={"on_conflict": "queue_one"})
    assert queued.status_code == 202 and "joined" not in queued.json  # a new execution, answered as any execute
    queued = queued.json
    assert queued["executionId"] != running and queued["status"] == "queued"
    for _ in range(3):
        again = client.post("/api/workflow/slow/execute", json={"on_conflict": "queue_one"})
        assert again.status_code == 200 and again.json["joined"] is True
        assert again.json["executionId"] == queued["executionId"]
    assert sorted(executions(client)) == sorted([running, queued["executionId"]])
    assert client.get(f"/api/v1/runs/{queued['executionId']}").json["joined_count"] == 3


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


def test_thirty_concurrent_executes_with_join_across_two_gateways_on_postgresql_make_one_run(gateways_on_postgresql):
    thirty_joins_make_one_run(gateways_on_postgresql, "/api/workflow/slow/execute", {"on_conflict": "join"},
                              "executionId", target="slow")


def test_thirty_concurrent_executes_with_join_across_two_gateways_on_sqlite_make_one_run(workdir: Path):
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "slow.yaml").write_text(SLOW)
    gateways = [GunicornServer(workdir, workers=2, ready_path="/health", FLOWGATE_EXECUTOR_THREADS="0")
                for _ in range(2)]  # the run stays queued: all must join
    try:
        for gateway in gateways:
            gateway.start()

        thirty_joins_make_one_run(gateways, "/api/workflow/slow/execute", {"on_conflict": "join"}, "executionId",
                                  target="slow")
    finally:
        for gateway in gateways:
            gateway.kill()
