"""Poll hints: a 202 and a GET of a run not ended carry Retry-After, from the target's recent durations (1-30 s)."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from app.runs.models import Run, utcnow
from app.runs.store import NewRun


def ended_runs(store, target: str, seconds: list[float]) -> None:
    """Runs of `target` that ran `seconds` each and ended a minute ago."""
    for duration in seconds:
        run, _ = store.create_run(NewRun(kind="connector", target=target, params={}, backend="local",
                                         concurrency_key="k"))
        end = utcnow() - timedelta(minutes=1)
        with store.db.session(write=True) as session:
            session.execute(update(Run).where(Run.id == run.id).values(
                status="completed", started_at=end - timedelta(seconds=duration), finished_at=end))


def set_run(store, run_id: str, **values) -> None:
    with store.db.session(write=True) as session:
        session.execute(update(Run).where(Run.id == run_id).values(**values))


def test_without_history_a_202_and_a_get_say_two_seconds_and_an_ended_run_says_nothing(client):
    accepted = client.post("/trigger", json={"connector_id": "shop"})
    assert accepted.status_code == 202 and accepted.headers["Retry-After"] == "2"
    assert client.get(accepted.json["status_url"]).headers["Retry-After"] == "2"
    cancelled = client.post(f"{accepted.json['status_url']}/cancel")
    assert cancelled.status_code == 200 and "Retry-After" not in cancelled.headers
    assert "Retry-After" not in client.get(accepted.json["status_url"]).headers


def test_the_hint_is_the_targets_median_duration_less_what_has_run(app, client):
    store = app.extensions["flowgate"].store
    ended_runs(store, "shop", [10, 12, 40])  # median 12 s
    ended_runs(store, "numbers", [300, 400])  # past the cap
    ended_runs(store, "products", [0.2])  # under the floor
    queued = client.post("/trigger", json={"connector_id": "shop"})
    assert queued.headers["Retry-After"] == "12"
    set_run(store, queued.json["run_id"], status="running", started_at=utcnow() - timedelta(seconds=5))
    assert client.get(queued.json["status_url"]).headers["Retry-After"] in ("7", "6")
    set_run(store, queued.json["run_id"], status="queued", started_at=None,
            next_attempt_at=utcnow() + timedelta(seconds=10))  # a retry waiting: its wait counts too
    assert client.get(queued.json["status_url"]).headers["Retry-After"] in ("22", "21")
    assert client.post("/trigger", json={"connector_id": "numbers"}).headers["Retry-After"] == "30"
    assert client.post("/trigger", json={"connector_id": "products"}).headers["Retry-After"] == "1"


def test_a_workflow_execution_carries_the_hint_too(client):
    accepted = client.post("/api/workflow/wf/execute", json={"workflow": {"nodes": [{"id": "a", "type": "transform"}]}})
    assert accepted.status_code == 202 and accepted.headers["Retry-After"] == "2"
    assert client.get(accepted.json["statusUrl"]).headers["Retry-After"] == "2"
