"""A deeply nested document can neither get into the run store from a request nor, once there (stored before the
bound, or by a node), break a page for anyone: the run shows as unreadable, its callback is given up (review M1)."""
from __future__ import annotations

from typing import Any

import pytest

from app.callback_sender import CallbackSender
from app.runs.store import NewRun
from connectors import secrets
from connectors.outbound import OutboundPolicy
from flows.engine import _json_ready
from flows.nodes import NodeFailed
from tests.support.fake_services import CallbackReceiver
from tests.support.waiting import wait_until


def nested(levels: int, leaf: Any = 1) -> Any:
    """`levels` objects inside each other: nested(1) is {"a": 1}."""
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


OUT = {"nodes": [{"id": "out", "type": "output", "config": {"value": "{{ inputs }}"}}]}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/trigger", {"connector_id": "numbers", "params": {"initial_value": nested(600)}}, "params.initial_value"),
    ("/api/v1/connectors/numbers/runs", {"params": {"n": nested(40)}}, "params.n"),
    ("/api/v1/connectors/numbers/preview", {"params": {"n": nested(40)}}, "params.n"),
    ("/api/workflow/greet/execute", {"inputs": {"x": nested(500)}, "workflow": OUT}, "inputs.x"),
    ("/api/workflow/greet/execute", {"workflow": {"nodes": [{"id": "out", "type": "output",
                                                             "config": {"value": nested(40)}}]}}, "workflow.nodes"),
    ("/api/workflow/greet/execute", {"labels": {"team": nested(40, "x")}, "workflow": OUT}, "labels.team"),
    ("/api/workflow/x/execute-node", {"nodeId": "t", "nodeType": "transform", "node": {"config": nested(500)},
                                      "inputData": {}}, "node.config"),
    ("/api/workflow/x/execute-node", {"nodeId": "t", "nodeType": "transform", "node": {},
                                      "inputData": {"x": nested(500)}}, "inputData.x"),
])
def test_a_field_nested_deeper_than_32_levels_is_a_422_naming_it_and_nothing_is_stored(client, path, body, field):
    response = client.post(path, json=body)
    assert response.status_code == 422 and response.mimetype == "application/problem+json", response.json
    assert response.json["errors"][0]["field"] == field
    assert "32 levels" in response.json["errors"][0]["message"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_32_levels_are_taken(client):
    response = client.post("/api/workflow/greet/execute", json={"inputs": nested(32), "workflow": OUT})
    assert response.status_code == 202, response.json


def test_a_rerun_holds_its_params_and_inputs_to_the_same_bounds(client, app):
    run, _ = app.extensions["flowgate"].store.create_run(NewRun(kind="connector", target="numbers", params={},
                                                                backend="local", concurrency_key="k"))
    app.extensions["flowgate"].store.cancel(run.id)
    deep = client.post(f"/api/v1/runs/{run.id}/rerun", json={"params": {"n": nested(40)}})
    assert deep.status_code == 422 and deep.json["errors"][0]["field"] == "params.n"
    large = client.post(f"/api/v1/runs/{run.id}/rerun", json={"params": {"n": "x" * 20_000}})
    assert large.status_code == 422 and large.json["errors"][0]["field"] == "params"


def store_poison_runs(app, callback_url: str | None = None) -> tuple[str, str, str]:
    """A connector run and a workflow run stored as the review stored them (before the bound), and a sound run."""
    store = app.extensions["flowgate"].store
    poison, _ = store.create_run(NewRun(kind="connector", target="numbers", backend="local", concurrency_key="a",
                                        params={"initial_value": nested(600)}, callback_url=callback_url))
    store.cancel(poison.id)  # ended: its callback is due
    definition = {"id": "greet", "nodes": [{"id": "out", "type": "output", "config": {"value": nested(500)}}]}
    workflow, _ = store.create_run(NewRun(kind="workflow", target="greet", backend="local", concurrency_key="b",
                                          params={"workflow": definition, "inputs": {"x": nested(500)},
                                                  "mode": "optimized", "from_file": False}))
    store.nodes.save(workflow.id, [(0, {"id": "out", "type": "output", "layer": 0, "status": "completed",
                                         "attempts": 1, "cached": False, "started_at": None, "finished_at": None,
                                         "duration_seconds": None, "output": nested(500)})])
    sound, _ = store.create_run(NewRun(kind="connector", target="numbers", params={"n": 3}, backend="local",
                                       concurrency_key="c"))
    return poison.id, workflow.id, sound.id


@pytest.mark.parametrize("remembered_secret", [False, True])  # scrub walks documents only once a secret is known
def test_a_poison_run_shows_as_unreadable_and_every_page_around_it_works(client, app, monkeypatch, remembered_secret):
    if remembered_secret:
        monkeypatch.setattr(secrets, "_values", ("a-remembered-secret",))
    poison, workflow, sound = store_poison_runs(app)
    for query in ("", "?status=cancelled", "?connector_id=numbers", "?connector_id=greet"):
        page = client.get(f"/api/v1/runs{query}")
        assert page.status_code == 200, (query, page.json)
        by_id = {item["run_id"]: item for item in page.json["items"]}
        for run_id in {poison, workflow} & set(by_id):
            assert by_id[run_id]["unreadable"] is True and by_id[run_id]["params"] == {}
            assert by_id[run_id]["error"]["code"] == "unreadable_run"
        if sound in by_id:
            assert by_id[sound]["unreadable"] is False and by_id[sound]["params"] == {"n": 3}
    one = client.get(f"/api/v1/runs/{poison}")
    assert one.status_code == 200 and one.json["unreadable"] is True and one.json["status"] == "cancelled"
    connector = client.get("/api/v1/connectors/numbers")
    assert connector.status_code == 200
    assert [run["unreadable"] for run in connector.json["latest_runs"]] == [False, True]
    execution = client.get(f"/api/workflow/execution/{workflow}")
    assert execution.status_code == 200 and execution.json["unreadable"] is True
    assert execution.json["nodes"] == [] and execution.json["error"]["code"] == "unreadable_run"
    assert client.get("/api/v1/connectors/numbers/stats").status_code == 200


def test_the_callback_of_a_poison_run_is_given_up_not_retried_for_ever(app):
    receiver = CallbackReceiver()
    store = app.extensions["flowgate"].store
    sender = CallbackSender(store, OutboundPolicy.parse(f"127.0.0.1:{receiver.port}"), "secret",
                            max_attempts=5, backoff_seconds=0.05, poll_seconds=0.05)
    try:
        poison, _, _ = store_poison_runs(app, callback_url=f"{receiver.url}/hook")
        sender.start()
        callback = wait_until(lambda: (c := store.get(poison).callback) and c.status == "failed" and c, 30,
                              "the callback given up")
        assert len(callback.attempts) == 1 and "nested more than" in callback.attempts[0]["error"]
        assert receiver.raw == []
    finally:
        sender.stop()
        receiver.stop()


def test_a_node_output_nested_too_deeply_fails_the_node_instead_of_being_stored():
    # An http node's response or a transform's value: what is stored must be what the run's pages can show.
    assert _json_ready(nested(64), 10**6) == nested(64)
    with pytest.raises(NodeFailed) as failed:
        _json_ready(nested(65), 10**6)
    assert failed.value.code == "output_too_deep" and failed.value.terminal
