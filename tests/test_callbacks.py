"""Run callbacks: signed POSTs of the run document when a run ends, retried, recorded, delivered once."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from app import create_app
from app.callback_sender import CallbackSender, verify
from app.runs.models import utcnow
from app.runs.store import NewRun
from connectors.outbound import OutboundPolicy
from tests.support.fake_services import CallbackReceiver
from tests.support.waiting import wait_for_callback, wait_until, wait_until_ended

pytestmark = pytest.mark.long(seconds=30)  # started first in the parallel run (conftest.py)

SECRET = "callback-secret-for-tests"


@pytest.fixture
def receiver():
    server = CallbackReceiver()
    yield server
    server.stop()


@pytest.fixture
def app_config(app_config: dict, receiver: CallbackReceiver) -> dict:
    return {**app_config, "callback_secret": SECRET, "callback_allowed_hosts": f"127.0.0.1:{receiver.port}",
            "callback_backoff_seconds": 0.05, "callback_max_attempts": 3}


@pytest.fixture
def sending_app(running_app):
    callbacks = running_app.extensions["flowgate"].callbacks
    callbacks.start()
    yield running_app
    callbacks.stop()


class Sweeps:
    """Counts each sender's sweeps that found nothing to deliver and began after the last `mark()`. A sender that
    has swept once since a delivery was recorded has finished any send it had in flight, and would have claimed a
    second delivery had one been due: once every sender has, "sent once" is proven, not hoped for."""

    def __init__(self, store, monkeypatch) -> None:
        self.generation = 0
        self.empty: dict[tuple[str, int], int] = {}
        claim = store.callbacks.claim

        def counted(owner: str, **kwargs):
            generation = self.generation  # the mark this sweep began after
            claimed = claim(owner, **kwargs)
            if claimed is None:
                self.empty[owner, generation] = self.empty.get((owner, generation), 0) + 1
            return claimed

        monkeypatch.setattr(store.callbacks, "claim", counted)

    def mark(self) -> None:
        self.generation += 1

    def wait_for_one_each(self, senders: list[CallbackSender], what: str = "a sweep by every sender") -> None:
        wait_until(lambda: all(self.empty.get((s.owner, self.generation)) for s in senders), what=what)


def test_an_ended_run_is_posted_signed_to_its_callback_url(sending_app, receiver):
    client = sending_app.test_client()
    url = f"{receiver.url}/hook?token=receiver-secret"
    run = client.post("/trigger", json={"connector_id": "numbers", "callback_url": url}).json
    assert run["callback"] == {"url": f"{receiver.url}/hook", "status": "pending", "attempts": []}  # no query shown
    done = wait_until_ended(client, run["status_url"])
    callback = wait_for_callback(client, run["run_id"], "delivered")
    assert [a["status_code"] for a in callback["attempts"]] == [204]
    headers, body = receiver.raw[0]
    assert verify(SECRET, headers["x-flowgate-signature"], body)
    assert not verify("another-secret", headers["x-flowgate-signature"], body)
    sent = json.loads(body)
    assert sent["run_id"] == run["run_id"] and sent["status"] == "completed" == done["status"]
    assert sent["result"]["rows"] == {"numbers": 10} and headers["x-flowgate-run-id"] == run["run_id"]


def test_a_failing_receiver_is_retried_with_backoff_and_every_attempt_is_recorded(sending_app, receiver):
    receiver.failures = 2
    client = sending_app.test_client()
    run = client.post("/trigger", json={"connector_id": "numbers", "callback_url": f"{receiver.url}/hook"}).json
    callback = wait_for_callback(client, run["run_id"], "delivered")
    assert [a.get("status_code") for a in callback["attempts"]] == [500, 500, 204]
    assert [a["attempt"] for a in callback["attempts"]] == [1, 2, 3]
    # A receiver that committed before answering 500 dedupes the retries on the delivery id: one id, every attempt.
    headers = [headers for headers, _ in receiver.raw]
    assert {h["x-flowgate-delivery"] for h in headers} == {run["run_id"]}
    assert [h["x-flowgate-attempt"] for h in headers] == ["1", "2", "3"]


def test_a_retried_trigger_with_another_callback_url_is_a_conflict(app, client, receiver):
    body = {"connector_id": "numbers", "callback_url": f"{receiver.url}/hook"}
    first = client.post("/trigger", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/trigger", json=body, headers={"Idempotency-Key": "k-1"})
    other = client.post("/trigger", json={**body, "callback_url": f"{receiver.url}/other"},
                        headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and again.json["run_id"] == first.json["run_id"]
    assert other.status_code == 409, other.json


def test_a_receiver_that_never_answers_2xx_ends_failed_after_the_last_attempt(sending_app, receiver):
    receiver.failures = 100
    client = sending_app.test_client()
    run = client.post("/trigger", json={"connector_id": "numbers", "callback_url": f"{receiver.url}/hook"}).json
    callback = wait_for_callback(client, run["run_id"], "failed")
    assert len(callback["attempts"]) == 3 and all(a["error"] == "HTTP 500" for a in callback["attempts"])


def test_a_crashed_run_is_reported_too_and_two_senders_deliver_it_once(app, receiver, monkeypatch):
    """Two gateway processes' senders on one store; a run whose process died ends crashed and is posted once."""
    store = app.extensions["flowgate"].store
    run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                     concurrency_key="k", callback_url=f"{receiver.url}/hook"))
    assert store.claim_next("dead-process", lease_seconds=0.01).id == run.id
    assert wait_until(store.recover_expired, what="the lease lapsed") == [run.id]
    sweeps = Sweeps(store, monkeypatch)
    policy = OutboundPolicy.parse(f"127.0.0.1:{receiver.port}")
    senders = [CallbackSender(store, policy, SECRET, poll_seconds=0.01) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: store.get(run.id).callback.status == "delivered", what="the delivery")
        sweeps.mark()
        sweeps.wait_for_one_each(senders)
    finally:
        for sender in senders:
            sender.stop()
    assert len(receiver.raw) == 1
    assert json.loads(receiver.raw[0][1])["status"] == "crashed"


def test_a_delivery_slower_than_its_claim_is_still_sent_once(app, receiver, monkeypatch):
    """A receiver that answers slowly (each header line within the read timeout) outlasts the claim: another
    process's sender must not take the delivery over while the first is still sending it."""
    store = app.extensions["flowgate"].store
    run, _ = store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="local",
                                     concurrency_key="k", callback_url=f"{receiver.url}/hook"))
    store.claim_next("executor", lease_seconds=30)
    store.finish(run.id, "executor", "completed", result={"rows": {}})
    receiver.drip_seconds = 0.5  # a header line every 0.5 s, well inside the 5 s read timeout, until released
    sweeps = Sweeps(store, monkeypatch)
    policy = OutboundPolicy.parse(f"127.0.0.1:{receiver.port}")
    senders = [CallbackSender(store, policy, SECRET, poll_seconds=0.05, timeout_seconds=5.0) for _ in range(2)]
    senders[0].start()
    try:
        wait_until(lambda: receiver.raw, what="the first sender's POST")
        claim_lapsed_at = utcnow() + timedelta(seconds=senders[0].claim_seconds)  # the first claim is older
        senders[1].start()  # the second process starts polling while the first is sending
        wait_until(lambda: utcnow() > claim_lapsed_at, what="the first claim's end")
        sweeps.mark()
        sweeps.wait_for_one_each([senders[1]], "a sweep by the second sender after the first claim would have lapsed")
        receiver.release.set()
        wait_until(lambda: store.get(run.id).callback.status == "delivered", what="the delivery")
        sweeps.mark()
        sweeps.wait_for_one_each(senders)
    finally:
        receiver.release.set()
        for sender in senders:
            sender.stop()
    callback = store.get(run.id).callback
    assert callback.status == "delivered" and len(callback.attempts) == 1
    assert len(receiver.raw) == 1


def test_a_store_error_after_a_delivery_does_not_end_the_sender_or_send_twice(app, receiver, monkeypatch):
    store = app.extensions["flowgate"].store
    runs = []
    for target in ("numbers", "events"):
        run, _ = store.create_run(NewRun(kind="connector", target=target, params={}, backend="local",
                                         concurrency_key=target, callback_url=f"{receiver.url}/hook"))
        store.claim_next("executor", lease_seconds=30)
        store.finish(run.id, "executor", "completed", result={"rows": {}})
        runs.append(run)
    record = store.callbacks.record_delivery
    failures = []

    def fails_once(*args, **kwargs):  # the database hiccups right after the receiver said 204
        if not failures:
            failures.append(args[0])
            raise RuntimeError("database went away")
        return record(*args, **kwargs)

    monkeypatch.setattr(store.callbacks, "record_delivery", fails_once)
    sweeps = Sweeps(store, monkeypatch)
    sender = CallbackSender(store, OutboundPolicy.parse(f"127.0.0.1:{receiver.port}"), SECRET, poll_seconds=0.05)
    sender.start()
    try:
        wait_until(lambda: all(store.get(r.id).callback.status == "delivered" for r in runs), what="both deliveries")
        sweeps.mark()
        sweeps.wait_for_one_each([sender])
    finally:
        sender.stop(timeout=5)
    assert [store.get(r.id).callback.status for r in runs] == ["delivered", "delivered"]
    assert len(receiver.raw) == 2 and failures
    assert sender._http is None  # its pooled client, and the connection kept alive to the receiver, closed with it


@pytest.mark.parametrize("url, message", [
    ("http://example.com/hook", "not on the allow-list"),
    ("ftp://127.0.0.1/hook", "scheme 'ftp' is not allowed"),
    ("http://2130706433/hook", "not on the allow-list"),
    ("not a url", "scheme '(none)' is not allowed"),
])
def test_a_callback_url_outside_the_allow_list_is_a_422_and_stores_nothing(client, url, message):
    response = client.post("/trigger", json={"connector_id": "numbers", "callback_url": url})
    assert response.status_code == 422 and response.json["errors"][0]["field"] == "callback_url"
    assert message in response.json["errors"][0]["message"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_callbacks_are_refused_when_no_secret_is_configured(app_config, receiver):
    app = create_app({**app_config, "callback_secret": None})
    response = app.test_client().post("/api/workflow/x/execute", json={
        "workflow": {"nodes": [{"id": "a", "type": "trigger"}]}, "callback_url": f"{receiver.url}/hook"})
    assert response.status_code == 422 and "FLOWGATE_CALLBACK_SECRET" in response.json["errors"][0]["message"]
    app.extensions["flowgate"].store.dispose()


def test_prefer_wait_is_the_header_form_of_wait(running_app):
    client = running_app.test_client()
    done = client.post("/trigger", json={"connector_id": "numbers"}, headers={"Prefer": "respond-async, wait=30"})
    assert done.status_code == 200 and done.json["status"] == "completed"
    assert done.headers["Preference-Applied"] == "wait=30"
    capped = client.post("/trigger", json={"connector_id": "numbers"}, headers={"Prefer": "wait=100000"})
    assert capped.headers["Preference-Applied"] == "wait=300"
    bad = client.post("/trigger", json={"connector_id": "numbers"}, headers={"Prefer": "wait=soon"})
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "Prefer"


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "-1", '"nan"'])
def test_prefer_wait_that_is_not_a_finite_wait_is_a_422_naming_the_header(running_app, value):
    # A NaN passed min/max untouched and made the wait endless, past FLOWGATE_MAX_WAIT_SECONDS.
    client = running_app.test_client()
    response = client.post("/trigger", json={"connector_id": "numbers"}, headers={"Prefer": f"wait={value}"})
    assert response.status_code == 422 and response.mimetype == "application/problem+json"
    assert response.json["errors"][0]["field"] == "Prefer"
    assert "Preference-Applied" not in response.headers
