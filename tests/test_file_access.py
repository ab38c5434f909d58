"""A caller's params never read a file outside the connector's declared folder: globs, `..`, symlinks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from connectors.outbound import OutboundPolicy
from connectors.preview import preview_connector
from connectors.registry import ConnectorRegistry, RegistryError
from connectors.spec import ParamsError

ESCAPES = ["../../../etc/passwd", "../*", "../**/*.py", "/etc/passwd", "~/.bashrc", "sub/../../x.csv",
           "..\\secrets.csv", "**/../../*.csv", "file:///etc/passwd", "a\x00.csv", ".."]


@pytest.mark.parametrize("glob", ESCAPES)
def test_a_glob_that_climbs_out_of_the_folder_is_refused_in_params(workdir, glob):
    products = ConnectorRegistry.load(workdir / "connectors.yaml").get("products")
    with pytest.raises(ParamsError) as info:
        products.with_params({"file_glob": glob})
    assert info.value.field == "params.file_glob"


@pytest.mark.parametrize("glob", ["*.csv", "**/*.csv", "sub/*.csv", "products.csv", "[ab]*.csv", "a..b.csv"])
def test_a_glob_inside_the_folder_is_accepted(workdir, glob):
    products = ConnectorRegistry.load(workdir / "connectors.yaml").get("products")
    assert products.with_params({"file_glob": glob}).source.file_glob == glob


def test_a_declared_table_list_bounds_the_tables_params_may_ask_for(workdir):
    shop = ConnectorRegistry.load(workdir / "connectors.yaml").get("shop")
    assert shop.with_params({"tables": ["orders"]}).source.tables == ["orders"]
    with pytest.raises(ParamsError) as info:
        shop.with_params({"tables": ["orders", "sqlite_master"]})
    assert info.value.field == "params.tables" and "sqlite_master" in info.value.message
    assert shop.with_params({"tables": None}).source.tables == ["orders", "customers"]  # never every table there is


@pytest.mark.parametrize("path,body", [
    ("/api/v1/connectors/products/preview", {"params": {"file_glob": "../../../etc/passwd"}}),
    ("/api/v1/connectors/products/preview", {"params": {"file_glob": "../*"}}),
    ("/trigger", {"connector_id": "products", "params": {"file_glob": "../**/*.py"}}),
    ("/api/v1/connectors/products/runs", {"params": {"file_glob": "../connectors.yaml"}}),
])
def test_the_api_refuses_a_climbing_glob_and_records_nothing(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    assert [error["field"] for error in response.json["errors"]] == ["params.file_glob"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_a_connector_node_cannot_read_outside_the_folder_either(client):
    response = client.post("/api/workflow/any/execute-node", json={
        "nodeId": "load", "nodeType": "connector",
        "node": {"config": {"connector_id": "products", "params": {"file_glob": "../../../etc/passwd"}}}})
    assert response.json["success"] is False and "file_glob" in response.json["error"]["message"]
    assert client.get("/api/v1/runs").json["items"] == []


def test_a_symlink_inside_the_folder_to_a_file_outside_is_never_read(workdir, client):
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("sku,name,price_cents\nS-1,leaked,1\n")
    os.symlink(outside / "secret.csv", workdir / "files" / "linked.csv")
    os.symlink(outside, workdir / "files" / "linked_dir")
    for glob in ("*.csv", "**/*.csv", "linked.csv", "linked_dir/*.csv"):
        preview = client.post("/api/v1/connectors/products/preview", json={"params": {"file_glob": glob}})
        assert preview.status_code == 200, preview.json
        names = [row["name"] for row in preview.json["resources"]["products"]["rows"]]
        assert "leaked" not in names, glob
    assert Path(workdir / "files" / "linked.csv").read_text().count("leaked") == 1  # the link itself works


@pytest.mark.parametrize("spelling", ["{folder}", "file://{folder}", "file:{folder}", "file://localhost{folder}",
                                      "local://{folder}"])
def test_a_symlink_out_of_the_folder_is_never_read_whichever_way_the_folder_is_written(workdir, spelling):
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("sku,name,price_cents\nS-1,leaked,1\n")
    os.symlink(outside / "secret.csv", workdir / "files" / "linked.csv")
    os.symlink(outside, workdir / "files" / "linked_dir")
    bucket = spelling.format(folder=(workdir / "files").as_posix())
    (workdir / "url.yaml").write_text(f"connectors:\n  files_url:\n    source: {{kind: filesystem, "
                                      f"bucket_url: '{bucket}', file_glob: '*.csv'}}\n")
    spec = ConnectorRegistry.load(workdir / "url.yaml").get("files_url")
    for glob in ("*.csv", "**/*.csv", "linked.csv", "linked_dir/*.csv"):
        preview = preview_connector(spec.with_params({"file_glob": glob}), 10, OutboundPolicy())
        rows = preview["resources"]["files_url"]["rows"]
        assert "leaked" not in [row["name"] for row in rows], glob
    rows = preview_connector(spec, 10, OutboundPolicy())["resources"]["files_url"]["rows"]
    assert [row["name"] for row in rows] == ["Apple", "Bread", "Cheese"]  # the folder itself is read


def test_a_file_url_naming_another_host_is_refused_at_start_up(workdir):
    (workdir / "url.yaml").write_text("connectors:\n  files_url:\n    source: {kind: filesystem, "
                                      "bucket_url: 'file://files/public'}\n")
    with pytest.raises(RegistryError, match=r"connector 'files_url': field 'source.bucket_url'.*host"):
        ConnectorRegistry.load(workdir / "url.yaml")
