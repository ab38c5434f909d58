"""Schedules through the API: shown on connectors and workflows, paused and resumed with the admin scope (kept
in the run store), scheduled runs listed with their source; a bad schedule stops the start naming the field."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError
from tests.support.clock import Clock
from tests.support.workdir import CONNECTORS_YAML

READER, TRIGGERER, ADMIN = "reader-key-0123456789", "trigger-key-0123456789", "admin-key-0123456789"
SCHEDULED = CONNECTORS_YAML + """
  nightly:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}
  dormant:
    source: {kind: python, ref: "connectors.demo:numbers", args: {n: 1}}
    schedule: {interval: 60, active: false}
"""
WORKFLOW = """
description: says hello every five minutes
schedule: {cron: "*/5 * * * *", catch_up: none}
nodes:
  - {id: start, type: trigger}
  - {id: result, type: output, config: {value: hello}}
connections:
  - {from: start, to: result}
"""


@pytest.fixture
def app_config(app_config: dict, workdir: Path) -> dict:
    (workdir / "connectors.yaml").write_text(SCHEDULED)
    (workdir / "workflows").mkdir()
    (workdir / "workflows" / "hello.yaml").write_text(WORKFLOW)
    return {**app_config, "api_keys": f"dash:{READER}:read, backend:{TRIGGERER}:read+trigger, ops:{ADMIN}:admin"}


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def test_a_connector_shows_its_schedule_with_the_next_five_fire_times_in_its_zone(client):
    schedule = client.get("/api/v1/connectors/nightly", headers=key(READER)).json["schedule"]
    assert {k: schedule[k] for k in ("cron", "timezone", "catch_up", "max_catch_up", "state")} == {
        "cron": "0 2 * * *", "timezone": "Europe/Berlin", "catch_up": "latest", "max_catch_up": 10, "state": "active"}
    times = [datetime.fromisoformat(value) for value in schedule["next_fire_times"]]
    assert len(times) == 5 and all(t.strftime("%H:%M") == "02:00" for t in times)
    assert all(t.utcoffset() in (timedelta(hours=1), timedelta(hours=2)) for t in times)  # Berlin's offset
    assert schedule["last_run"] is None and (schedule["missed_slots"], schedule["skipped_slots"]) == (0, 0)
    assert client.get("/api/v1/connectors/shop", headers=key(READER)).json["schedule"] is None
    dormant = client.get("/api/v1/connectors/dormant", headers=key(READER)).json["schedule"]
    assert (dormant["state"], dormant["next_fire_times"]) == ("inactive", [])


def test_pause_needs_the_admin_scope_and_persists_across_a_restart(app_config, client):
    for who in (READER, TRIGGERER):
        refused = client.post("/api/v1/connectors/nightly/schedule/pause", headers=key(who))
        assert refused.status_code == 403 and refused.json["required_scope"] == "admin"
    paused = client.post("/api/v1/connectors/nightly/schedule/pause", headers=key(ADMIN))
    assert paused.status_code == 200
    assert (paused.json["state"], paused.json["paused_by"], paused.json["next_fire_times"]) == ("paused", "ops", [])
    restarted = create_app(app_config).test_client()
    shown = restarted.get("/api/v1/connectors/nightly", headers=key(READER)).json["schedule"]
    assert shown["state"] == "paused" and shown["paused_at"]
    resumed = restarted.post("/api/v1/connectors/nightly/schedule/resume", headers=key(ADMIN)).json
    assert (resumed["state"], resumed["paused_by"], len(resumed["next_fire_times"])) == ("active", None, 5)


def test_pausing_what_has_no_schedule_or_an_inactive_one_is_refused(client):
    for path, status, code in (("/api/v1/connectors/shop/schedule/pause", 404, "schedule_not_found"),
                               ("/api/v1/connectors/nope/schedule/pause", 404, "connector_not_found"),
                               ("/api/v1/workflows/nope/schedule/resume", 404, "workflow_not_found"),
                               ("/api/v1/connectors/dormant/schedule/pause", 409, "schedule_inactive")):
        response = client.post(path, headers=key(ADMIN))
        assert (response.status_code, response.json["code"]) == (status, code), path
        assert response.mimetype == "application/problem+json"


def test_a_workflow_file_shows_and_pauses_its_schedule(client):
    listed = client.get("/api/v1/workflows", headers=key(READER)).json["items"]
    assert listed == [{"id": "hello", "description": "says hello every five minutes", "nodes": 2, "scheduled": True}]
    detail = client.get("/api/v1/workflows/hello", headers=key(READER)).json
    assert detail["layers"] == [["start"], ["result"]] and detail["schedule"]["catch_up"] == "none"
    assert len(detail["schedule"]["next_fire_times"]) == 5
    paused = client.post("/api/v1/workflows/hello/schedule/pause", headers=key(ADMIN))
    assert paused.json["state"] == "paused"
    assert client.get("/api/v1/workflows/missing", headers=key(READER)).json["code"] == "workflow_not_found"


def test_scheduled_runs_are_listed_with_their_source_and_filtered_by_it(app, client):
    services = app.extensions["flowgate"]
    clock = Clock(datetime(2025, 5, 1, 23, 59, 50, tzinfo=timezone.utc))
    services.scheduler.clock = clock
    services.scheduler.run_once()
    clock.advance(seconds=20)  # 00:00:10 UTC = 02:00:10 Berlin: nightly's slot
    services.scheduler.run_once()
    client.post("/trigger", json={"connector_id": "nightly"}, headers=key(TRIGGERER))
    scheduled = client.get("/api/v1/runs?source=schedule", headers=key(READER)).json["items"]
    assert {(run["connector_id"] or run["workflow_id"]) for run in scheduled} == {"nightly", "hello"}
    nightly = next(run for run in scheduled if run["connector_id"] == "nightly")
    assert nightly["source"] == "schedule" and nightly["scheduled_for"] == "2025-05-02T00:00:00Z"
    assert nightly["schedule"] == {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "catch_up": "latest",
                                   "late_seconds": 10.0}
    by_api = client.get("/api/v1/runs?source=api", headers=key(READER)).json["items"]
    assert [(run["source"], run["scheduled_for"], run["schedule"]) for run in by_api] == [("api", None, None)]
    last = client.get("/api/v1/connectors/nightly", headers=key(READER)).json["schedule"]["last_run"]
    assert last["run_id"] == nightly["run_id"]
    assert client.get("/api/v1/runs?source=cron", headers=key(READER)).status_code == 422


def test_an_inline_workflow_cannot_declare_a_schedule(client):
    definition = {"schedule": {"interval": 60}, "nodes": [{"id": "start", "type": "trigger"}]}
    refused = client.post("/api/workflow/inline/execute", json={"workflow": definition}, headers=key(TRIGGERER))
    assert refused.status_code == 422 and refused.json["errors"][0]["field"] == "workflow.schedule"


@pytest.mark.parametrize(("schedule", "field"), [
    ('{cron: "0 2 * *"}', "schedule.cron"), ("{interval: 60, timezone: Mars/Olympus}", "schedule.timezone"),
    ("{rrule: 'FREQ=SOMETIMES'}", "schedule.rrule"), ("{interval: 60, catch_up: most}", "schedule.catch_up"),
    ("{cron: '* * * * *', interval: 60}", "schedule"),
])
def test_a_bad_schedule_stops_the_start_naming_the_connector_and_field(workdir, app_config, schedule, field):
    (workdir / "connectors.yaml").write_text(CONNECTORS_YAML + f"""
  broken_schedule:
    source: {{kind: python, ref: "connectors.demo:numbers"}}
    schedule: {schedule}
""")
    with pytest.raises(ConfigError, match=rf"connector 'broken_schedule': field '{field}'"):
        create_app(app_config)


def test_a_bad_workflow_schedule_names_the_file_and_field(workdir, app_config):
    (workdir / "workflows" / "hello.yaml").write_text(WORKFLOW.replace('"*/5 * * * *"', '"*/5 * * *"'))
    with pytest.raises(ConfigError, match=r"hello.yaml: schedule.cron: "):
        create_app(app_config)


def test_a_scheduled_callback_url_must_be_one_a_trigger_could_give(workdir, app_config):
    (workdir / "connectors.yaml").write_text(SCHEDULED.replace(
        '    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}\n',
        '    schedule: {cron: "0 2 * * *", timezone: Europe/Berlin}\n    callback_url: https://hooks.example.com/x\n'))
    with pytest.raises(ConfigError, match=r"connector 'nightly': field 'callback_url': callbacks are off"):
        create_app(app_config)
    with pytest.raises(ConfigError, match=r"field 'callback_url': host 'hooks.example.com:443' is not on"):
        create_app({**app_config, "callback_secret": "s" * 32, "callback_allowed_hosts": "other.example.com"})
    create_app({**app_config, "callback_secret": "s" * 32, "callback_allowed_hosts": "hooks.example.com"})


def test_the_openapi_document_describes_schedules(client):
    document = client.get("/openapi.json", headers=key(READER)).json
    schemas = document["components"]["schemas"]
    assert {"source", "scheduled_for", "schedule"} <= set(schemas["RunOut"]["properties"])
    assert "next_fire_times" in schemas["ScheduleOut"]["properties"]
    assert schemas["ConnectorDetail"]["properties"]["schedule"]
    source = next(p for p in document["paths"]["/api/v1/runs"]["get"]["parameters"] if p["name"] == "source")
    assert source["schema"]["enum"] == ["api", "schedule", "rerun", "workflow", "prefect"]
    pause = document["paths"]["/api/v1/connectors/{connector_id}/schedule/pause"]["post"]
    assert "admin scope" in pause["summary"] and {"200", "403", "404", "409"} <= set(pause["responses"])
    assert document["paths"]["/api/v1/workflows/{workflow_id}"]["get"]["parameters"][0]["schema"]["enum"] == ["hello"]
