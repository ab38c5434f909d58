"""Adopting flow runs someone started in Prefect, against a Prefect API answered by respx: which flow runs the
sync reads and how it pages through them. tests/test_prefect.py adopts one on a real server and worker."""
from __future__ import annotations

import json
import uuid

import httpx
import respx

from app import create_app

API = "http://prefect.test/api"


def flow_run(connector: str, tags: list[str]) -> dict:
    return {"id": str(uuid.uuid4()), "name": "hand-started", "tags": tags,
            "parameters": {"connector_id": connector, "params": {}},
            "state": {"type": "RUNNING", "name": "Running"}, "start_time": None}


def test_a_flow_run_started_by_hand_behind_hundreds_of_the_gateways_own_is_adopted_once(app_config):
    app = create_app({**app_config, "prefect_api_url": API})
    sync = app.extensions["flowgate"].prefect_sync
    ours = [flow_run("numbers", ["flowgate", f"flowgate-run:{uuid.uuid4().hex}"]) for _ in range(450)]
    by_hand = flow_run("numbers", ["flowgate"])
    unknown = flow_run("removed-since", [])  # names no connector of this gateway: left alone
    listed = ours[:420] + [by_hand, unknown] + ours[420:]  # newest first: the third page holds it
    with respx.mock:
        pages = respx.post(f"{API}/flow_runs/filter").mock(side_effect=lambda request: _page(request, listed))
        [run] = sync.adopt_once()
        assert sync.adopt_once() == []  # the next pass: already a run
    first = json.loads(pages.calls[0].request.content)
    assert first["flows"] == {"name": {"any_": ["flowgate-connector"]}} and first["limit"] == 200
    assert [json.loads(call.request.content)["offset"] for call in pages.calls[:3]] == [0, 200, 400]
    later = json.loads(pages.calls[3].request.content)["flow_runs"]["expected_start_time"]["after_"]
    assert later > first["flow_runs"]["expected_start_time"]["after_"]  # the next pass reads what came due since
    assert (run.target, run.source, run.backend, run.prefect_flow_run_id, run.status) == (
        "numbers", "prefect", "prefect", by_hand["id"], "running")
    store = app.extensions["flowgate"].store
    assert [r.id for r in store.list(source="prefect")] == [run.id]
    store.dispose()


def _page(request: httpx.Request, listed: list[dict]) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(200, json=listed[body["offset"]: body["offset"] + body["limit"]])
