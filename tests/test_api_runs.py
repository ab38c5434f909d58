"""GET /api/v1/runs (filters, pages), GET /api/v1/runs/<id>, POST /api/v1/runs/<id>/cancel."""
from __future__ import annotations

from tests.support.waiting import wait_until, wait_until_ended


def trigger(client, connector_id: str, **extra) -> dict:
    response = client.post("/trigger", json={"connector_id": connector_id, **extra})
    assert response.status_code == 202, response.json
    return response.json


def test_runs_are_listed_newest_first_with_filters_and_pages(client):
    ids = [trigger(client, name)["run_id"] for name in ("shop", "numbers", "shop", "numbers", "shop")]
    assert [r["run_id"] for r in client.get("/api/v1/runs").json["items"]] == ids[::-1]
    shop = client.get("/api/v1/runs?connector_id=shop").json["items"]
    assert [r["run_id"] for r in shop] == [ids[4], ids[2], ids[0]]
    assert client.get("/api/v1/runs?status=completed").json["items"] == []
    page = client.get("/api/v1/runs?limit=2").json
    collected = [r["run_id"] for r in page["items"]]
    while page["next_cursor"]:
        page = client.get(f"/api/v1/runs?limit=2&cursor={page['next_cursor']}").json
        collected += [r["run_id"] for r in page["items"]]
    assert collected == ids[::-1]


def test_a_queued_run_is_cancelled_at_once(client):
    run = trigger(client, "shop")
    response = client.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert response.status_code == 200 and response.json["status"] == "cancelled"
    assert client.get(run["status_url"]).json["status"] == "cancelled"


def test_a_running_run_is_cancelling_then_cancelled_at_its_next_checkpoint(running_app):
    client = running_app.test_client()
    run = trigger(client, "slow", params={"delay_seconds": 3600})  # it ends only by being cancelled
    wait_until(lambda: client.get(run["status_url"]).json["status"] == "running", what="the run started")
    response = client.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert response.status_code == 202 and response.json["status"] == "cancelling"
    done = wait_until_ended(client, run["status_url"])
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"


def test_cancelling_a_finished_run_is_a_409(running_app):
    client = running_app.test_client()
    run = client.post("/trigger", json={"connector_id": "numbers", "wait": 60}).json
    response = client.post(f"/api/v1/runs/{run['run_id']}/cancel")
    assert response.status_code == 409 and response.json["code"] == "run_already_ended"
    assert client.get(run["status_url"]).json["status"] == "completed"


def test_an_unknown_run_is_a_404_problem(client):
    for response in (client.get("/api/v1/runs/nope"), client.post("/api/v1/runs/nope/cancel")):
        assert response.status_code == 404 and response.json["code"] == "run_not_found"
        assert response.mimetype == "application/problem+json"



def test_every_cursor_of_the_documented_pattern_is_a_page_not_a_500(client):
    # Security review L6 (an out-of-range cursor was a 500): the pattern's 16 digits of microseconds end in 2286.
    trigger(client, "numbers")
    for cursor in ("9999999999999999.ffffffffffffffffffffffffffffffff", "0.00000000000000000000000000000000"):
        response = client.get(f"/api/v1/runs?cursor={cursor}")
        assert response.status_code == 200, response.json
    assert len(client.get("/api/v1/runs?cursor=9999999999999999.ffffffffffffffffffffffffffffffff").json["items"]) == 1
    too_long = client.get("/api/v1/runs?cursor=99999999999999999.ffffffffffffffffffffffffffffffff")
    assert too_long.status_code == 422 and [e["field"] for e in too_long.json["errors"]] == ["cursor"]
