"""Every state flowgate proposes to Prefect, against what a real Prefect 3.8.8 server enforces. No worker: each test
proposes the worker's states itself (Pending, then Submitting, then Running: what Prefect's process worker and flow
engine send), in the order its race needs; both sides' proposals go through the same orchestration rules."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app import create_app
from app.backends.prefect_client import CLAIM_MESSAGE
from app.runs.models import Run
from app.runs.store import NewRun
from tests.support.prefect_stack import PrefectStack, served_stack

pytestmark = pytest.mark.long(seconds=40)  # started first in the parallel run (conftest.py)

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[PrefectStack]:
    with served_stack(tmp_path_factory.mktemp("prefect"), "flowgate_test_prefect_states") as stack:
        yield stack


def propose(stack: PrefectStack, flow_run_id: str, type_: str, name: str, force: bool = False) -> dict:
    return stack.api("POST", f"flow_runs/{flow_run_id}/set_state",
                     json={"state": {"type": type_, "name": name}, "force": force})


def state(stack: PrefectStack, flow_run_id: str) -> dict:
    return stack.api("GET", f"flow_runs/{flow_run_id}")["state"]


def history(stack: PrefectStack, flow_run_id: str) -> list[dict]:
    return sorted(stack.api("GET", f"flow_run_states/?flow_run_id={flow_run_id}"), key=lambda s: s["timestamp"])


def worker_claims(stack: PrefectStack, flow_run_id: str) -> None:
    """What Prefect's worker proposes when it picks a flow run up (it takes the deployment's one slot)."""
    for name in ("Pending", "Submitting"):
        assert propose(stack, flow_run_id, "PENDING", name)["status"] == "ACCEPT"


def worker_runs(stack: PrefectStack, flow_run_id: str, end: str = "COMPLETED") -> None:
    """A worker's whole run of the flow run, to its end."""
    worker_claims(stack, flow_run_id)
    assert propose(stack, flow_run_id, "RUNNING", "Running")["status"] == "ACCEPT"
    assert propose(stack, flow_run_id, end, end.title())["status"] == "ACCEPT"


@pytest.fixture
def flow_run(stack: PrefectStack) -> Iterator[Callable[[], str]]:
    """Makes scheduled flow runs of the `numbers` deployment; those left unfinished are ended afterwards, so none
    keeps the deployment's one concurrency slot from the next test."""
    deployment = stack.api("GET", "deployments/name/flowgate-connector/numbers")
    made = []

    def make() -> str:
        created = stack.api("POST", f"deployments/{deployment['id']}/create_flow_run",
                            json={"parameters": {"connector_id": "numbers", "params": {}}, "tags": ["flowgate"]})
        made.append(created["id"])
        return created["id"]

    yield make
    for flow_run_id in made:
        if state(stack, flow_run_id)["type"] not in ENDED:
            propose(stack, flow_run_id, "CANCELLED", "Cancelled", force=True)


@pytest.fixture
def gateway(stack: PrefectStack, tmp_path: Path):
    """A gateway's services on this server (nothing started: each test calls the backend itself)."""
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": stack.workdir / "deployed.yaml",
                      "workflows_dir": stack.workdir / "workflows",
                      "prefect_api_url": stack.api_url, "prefect_timeout_seconds": 20})
    services = app.extensions["flowgate"]
    yield services
    services.store.dispose()


def on_prefect(services, flow_run_id: str) -> Run:
    """A run of `numbers` the gateway sent to Prefect as flow run `flow_run_id`."""
    run, _ = services.store.create_run(NewRun(kind="connector", target="numbers", params={}, backend="prefect",
                                              concurrency_key="connector:numbers"))
    return services.store.record_flow_run(run.id, flow_run_id, "Scheduled")


# --- claims: the sync takes back a flow run no worker picked up ------------------------------------------------


def test_a_claim_on_a_flow_run_no_worker_took_is_ours_and_a_worker_cannot_take_it_after_it_is_closed(
        stack, flow_run, gateway):
    client = gateway.dispatcher.prefect.client
    flow_run_id = flow_run()
    assert client.claim_flow_run(flow_run_id) is True
    claimed = state(stack, flow_run_id)
    assert claimed["type"] == "PENDING" and claimed["message"] == CLAIM_MESSAGE
    client.close_reclaimed_flow_run(flow_run_id, "runs locally")
    assert state(stack, flow_run_id)["type"] == "CANCELLED"
    late = propose(stack, flow_run_id, "PENDING", "Pending")  # a worker's claim sent before the close
    assert late["status"] == "ABORT" and state(stack, flow_run_id)["type"] == "CANCELLED"


def test_a_claim_on_a_flow_run_a_worker_has_claimed_is_refused_and_leaves_the_workers_state(stack, flow_run, gateway):
    """Prefect 3.8.8 accepts a PENDING over a PENDING of another name (Pending -> Submitting): a claim named
    otherwise was accepted over the worker's, and putting the worker's state back lost its concurrency lease."""
    flow_run_id = flow_run()
    worker_claims(stack, flow_run_id)
    before = state(stack, flow_run_id)
    assert before["state_details"]["deployment_concurrency_lease_id"]
    assert gateway.dispatcher.prefect.client.claim_flow_run(flow_run_id) is False
    after = state(stack, flow_run_id)
    assert (after["type"], after["name"]) == ("PENDING", "Submitting")
    assert after["state_details"]["deployment_concurrency_lease_id"] == \
        before["state_details"]["deployment_concurrency_lease_id"]
    assert [s["name"] for s in history(stack, flow_run_id)] == ["Scheduled", "Pending", "Submitting"]


@pytest.mark.parametrize("slot", ["free", "held by another flow run"])
def test_a_claim_that_arrives_after_a_worker_ran_the_whole_flow_run_leaves_its_end(stack, flow_run, gateway, slot):
    """The sync read the flow run Scheduled; a worker ran it to its end before the claim arrived. Prefect accepts
    PENDING after an end; with the deployment's slot taken it reschedules the ended flow run instead
    (AwaitingConcurrencySlot), and a worker would run it a second time."""
    flow_run_id = flow_run()
    worker_runs(stack, flow_run_id)
    if slot != "free":
        worker_claims(stack, flow_run())
    assert gateway.dispatcher.prefect.client.claim_flow_run(flow_run_id) is False
    assert state(stack, flow_run_id)["type"] == "COMPLETED"


# --- cancels ---------------------------------------------------------------------------------------------------


def test_a_cancel_of_a_flow_run_no_worker_took_ends_it_at_once_and_no_worker_can_take_it_after(
        stack, flow_run, gateway):
    run = on_prefect(gateway, flow_run())
    cancelled = gateway.dispatcher.prefect.cancel(run)
    assert cancelled.status == "cancelled"
    assert state(stack, run.prefect_flow_run_id)["type"] == "CANCELLED"
    assert propose(stack, run.prefect_flow_run_id, "PENDING", "Pending")["status"] == "ABORT"


def test_a_cancel_of_a_flow_run_a_worker_claimed_but_never_started_ends_it_and_frees_the_slot(
        stack, flow_run, gateway):
    """Prefect 3.8.8 accepts a CANCELLED from PENDING: a run read as queued while a worker was starting it was
    recorded cancelled while its flow went on to run. CANCELLING first bars the flow from starting (Prefect refuses
    RUNNING from it); a flow that never started then cannot have run, so the run is cancelled and the flow run
    closed (the process a worker may still start finds its run ended in the run store). Left CANCELLING, it kept
    the deployment's one slot until Prefect's own timeout (300 s)."""
    run = on_prefect(gateway, flow_run())
    worker_claims(stack, run.prefect_flow_run_id)
    cancelled = gateway.dispatcher.prefect.cancel(run)
    assert cancelled.status == "cancelled"
    assert [s["type"] for s in history(stack, run.prefect_flow_run_id)][-2:] == ["CANCELLING", "CANCELLED"]
    next_one = flow_run()
    assert propose(stack, next_one, "PENDING", "Pending")["status"] == "ACCEPT"  # the slot is free


def test_a_cancel_of_a_running_flow_run_waits_for_the_worker_to_stop_it(stack, flow_run, gateway):
    run = on_prefect(gateway, flow_run())
    worker_claims(stack, run.prefect_flow_run_id)
    assert propose(stack, run.prefect_flow_run_id, "RUNNING", "Running")["status"] == "ACCEPT"
    cancelled = gateway.dispatcher.prefect.cancel(run)
    assert cancelled.status == "cancelling" and cancelled.cancel_requested
    assert state(stack, run.prefect_flow_run_id)["type"] == "CANCELLING"


def test_a_cancel_that_arrives_after_the_flow_run_ended_leaves_its_end(stack, flow_run, gateway):
    """A forced CANCELLING is accepted over a COMPLETED flow run, which then never ends again (the gateway's
    timeout cancels such a run, and a user's cancel can cross the end too)."""
    flow_run_id = flow_run()
    worker_runs(stack, flow_run_id)
    assert gateway.dispatcher.prefect.client.cancel_flow_run(flow_run_id) is None
    assert state(stack, flow_run_id)["type"] == "COMPLETED"
