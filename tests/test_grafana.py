"""deploy/grafana/flowgate.json: a dashboard Grafana imports, over metrics flowgate really exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

from app import metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "flowgate.json").read_text())
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]


def exported_names(app) -> set[str]:
    """Every series name /metrics can show, from the exposition's TYPE lines (a histogram's three included)."""
    services = app.extensions["flowgate"]
    text = metrics.exposition(services.store, services.settings.lease_seconds).decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_count", "_sum"))
        if kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
    return names


def test_every_query_reads_a_metric_flowgate_exports(app):
    exported = exported_names(app)
    queried = {name for panel in PANELS for target in panel["targets"]
               for name in re.findall(r"\bflowgate_[a-z_]+", target["expr"])}
    assert queried and queried <= exported, queried - exported
    for wanted in ("flowgate_triggers_total", "flowgate_runs_total", "flowgate_fallbacks_total",
                   "flowgate_executor_queued_runs", "flowgate_run_duration_seconds_bucket",
                   "flowgate_callbacks_total"):
        assert wanted in queried


def test_every_panel_asks_the_imported_prometheus_and_filters_by_job():
    assert DASHBOARD["__inputs"][0]["name"] == "DS_PROMETHEUS"
    for panel in PANELS:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])


def test_panels_have_unique_ids_and_do_not_overlap():
    assert len({panel["id"] for panel in DASHBOARD["panels"]}) == len(DASHBOARD["panels"])
    cells = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, panel["title"]
        assert grid["x"] + grid["w"] <= 24
        cells |= area
