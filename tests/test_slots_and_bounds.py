"""Long runs cannot fill every slot (issue 16, item 6): overridable arguments have declared bounds, a delay node
has a cap, and connectors and workflows each keep a slot the other cannot take."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.runs.slots import SlotClasses
from connectors.registry import ConnectorRegistry, RegistryError
from connectors.spec import ParamsError
from tests.support.gunicorn_server import ROOT
from tests.support.waiting import wait_until

LONG_WORKFLOW = {"nodes": [{"id": "wait", "type": "delay", "timeout": 120, "config": {"seconds": 60}}]}


def status_of(client, run_id: str) -> str:
    return client.get(f"/api/v1/runs/{run_id}").json["status"]


@pytest.fixture
def app_config(app_config: dict) -> dict:
    return {**app_config, "max_delay_seconds": 300}


def test_long_workflows_cannot_keep_a_connector_queued(running_app):
    client = running_app.test_client()
    workflows = [client.post("/api/workflow/long/execute", json={"workflow": LONG_WORKFLOW}).json["executionId"]
                 for _ in range(4)]
    wait_until(lambda: status_of(client, workflows[0]) == "running", 60, "the first workflow started")
    run_id = client.post("/trigger", json={"connector_id": "numbers"}).json["run_id"]
    wait_until(lambda: status_of(client, run_id) == "completed", 60, "the connector completed")
    assert [status_of(client, w) for w in workflows].count("running") == 1  # 2 slots: one each way
    for workflow in workflows:
        client.post(f"/api/v1/runs/{workflow}/cancel")


def test_the_other_way_round_connectors_keep_a_slot_for_workflows():
    classes = SlotClasses(slots=4, reserved=1)
    for index in range(3):
        classes.started(f"c{index}", "connector")
    assert classes.claimable() == ("workflow",)
    classes.ended("c0")
    assert classes.claimable() is None
    assert SlotClasses(slots=1, reserved=1).claimable() is None  # one slot: nothing to reserve
    crowded = SlotClasses(slots=3, reserved=2)
    crowded.started("c", "connector")
    crowded.started("w", "workflow")
    assert crowded.claimable() == ()  # the free slot is nobody's: both kinds are at their share


def test_a_delay_past_the_cap_fails_naming_the_setting(client):
    body = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "d", "nodeType": "delay", "node": {"timeout": 5, "config": {"seconds": 3600}}}).json
    assert body["success"] is False and body["error"]["code"] == "delay_too_long"
    assert "FLOWGATE_MAX_DELAY_SECONDS" in body["error"]["message"] and "300" in body["error"]["message"]


BOUNDED = """
connectors:
  sleeper:
    source:
      kind: python
      ref: "connectors.demo:numbers"
      args: {n: 10, delay_seconds: 0}
      bounds: {n: {minimum: 1, maximum: 1000}, delay_seconds: {minimum: 0, maximum: 5}}
"""


def test_an_override_outside_its_declared_bounds_is_refused(tmp_path: Path):
    (tmp_path / "c.yaml").write_text(BOUNDED)
    sleeper = ConnectorRegistry.load(tmp_path / "c.yaml").get("sleeper")
    assert sleeper.with_params({"delay_seconds": 5, "n": 1000}).source.args == {"n": 1000, "delay_seconds": 5}
    for params, field, message in (({"delay_seconds": 1_000_000}, "params.delay_seconds", "at most 5"),
                                   ({"n": 0}, "params.n", "at least 1")):
        with pytest.raises(ParamsError, match=message) as info:
            sleeper.with_params(params)
        assert info.value.field == field


def test_the_demo_connectors_overridable_delay_is_bounded():
    numbers = ConnectorRegistry.load(ROOT / "connectors.yaml").get("demo_numbers")
    with pytest.raises(ParamsError) as info:
        numbers.with_params({"delay_seconds": 1_000_000})
    assert info.value.field == "params.delay_seconds"


def test_a_trigger_outside_the_bounds_is_a_422_naming_the_param(client, workdir):
    (workdir / "connectors.yaml").write_text(BOUNDED)
    from app import create_app

    app = create_app({"var_dir": workdir / "var2", "connectors_file": workdir / "connectors.yaml",
                      "workflows_dir": workdir / "workflows"})
    response = app.test_client().post("/trigger", json={"connector_id": "sleeper",
                                                        "params": {"delay_seconds": 1_000_000}})
    assert response.status_code == 422 and response.json["errors"][0]["field"] == "params.delay_seconds"
    app.extensions["flowgate"].store.dispose()


@pytest.mark.parametrize("bounds, message", [
    ("{missing: {maximum: 1}}", "not in args"),
    ("{n: {maximum: 5}}", "args.n: the declared value must be at most 5"),
])
def test_bounds_are_checked_when_the_file_is_loaded(tmp_path: Path, bounds: str, message: str):
    (tmp_path / "c.yaml").write_text(BOUNDED.replace(
        "bounds: {n: {minimum: 1, maximum: 1000}, delay_seconds: {minimum: 0, maximum: 5}}", f"bounds: {bounds}"))
    with pytest.raises(RegistryError, match=message):
        ConnectorRegistry.load(tmp_path / "c.yaml")


def test_the_schedule_lane_takes_only_scheduled_runs_and_only_when_the_slots_are_full():
    classes = SlotClasses(slots=2, reserved=1, schedule_lane=1)
    classes.started("slot", "connector", scheduled=True)  # a scheduled run takes the lane first
    assert classes.room() == "any" and classes.claimable() is None  # both slots still free
    classes.started("c", "connector")
    classes.started("w", "workflow")
    assert classes.room() is None
    classes.ended("slot")
    assert classes.room() == "scheduled"  # the slots are full: only a scheduled run may start
    classes.started("next-slot", "workflow", scheduled=True)
    assert classes.room() is None
    assert SlotClasses(slots=1, reserved=0).room() == "any"
    full = SlotClasses(slots=1, reserved=0)
    full.started("c", "connector")
    assert full.room() is None  # no lane (FLOWGATE_SCHEDULE_SLOTS=0): scheduled runs share the slots
