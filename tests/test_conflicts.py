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
