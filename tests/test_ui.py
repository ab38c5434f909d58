"""The dashboard's files and what the page relies on: open /ui/ under a strict CSP, keys still guarding the API,
problem documents (never HTML) for errors, conditional GETs (ETag, 304) and the backend filter on runs."""
from __future__ import annotations

import re

import pytest

from app.api.ui import STATIC_DIR

READER = "ui-reader-key-0123456789"


@pytest.fixture
def app_config(app_config: dict) -> dict:
    return {**app_config, "api_keys": f"dash:{READER}:read"}


def test_the_page_and_its_modules_are_served_without_a_key_under_a_self_only_policy(client):
    page = client.get("/ui/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.get_data(as_text=True)
    assert "<script>" not in html and " style=" not in html and "//" not in html.replace("http://www.w3.org", "")
    for asset in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert client.get(f"/ui/{asset}").status_code == 200, asset
    module = client.get("/ui/app.js")
    assert "javascript" in module.mimetype
    assert client.get("/ui").status_code == 308


def test_no_redirect_names_the_requests_host(client):
    """Werkzeug's own redirects (`/ui` to `/ui/`, a merged `//`) built an absolute Location from the Host header."""
    to_index = client.get("/ui", headers={"Host": "evil.example"})
    assert to_index.status_code == 308 and to_index.headers["Location"] == "/ui/"
    assert client.get("/ui//app.js", headers={"Host": "evil.example"}).status_code == 404


def test_no_module_reaches_outside_the_gateway_or_writes_html_from_strings():
    for path in STATIC_DIR.rglob("*.js"):
        source = path.read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|eval\(|new Function", source), path
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", source), path


def test_the_api_still_needs_a_key_and_errors_under_ui_are_problem_documents(client):
    assert client.get("/api/v1/runs").status_code == 401
    missing = client.get("/ui/views/nothing.js")
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"
    assert client.post("/ui/").status_code == 405
    assert client.post("/ui/").mimetype == "application/problem+json"


def test_an_unchanged_document_is_a_304_without_a_body(client):
    headers = {"X-API-Key": READER}
    first = client.get("/api/v1/runs", headers=headers)
    etag = first.headers["ETag"]
    assert etag.startswith('W/"') and "private" in first.headers["Cache-Control"]
    again = client.get("/api/v1/runs", headers={**headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b"" and again.headers["ETag"] == etag
    assert client.get("/api/v1/runs", headers={**headers, "If-None-Match": 'W/"other"'}).status_code == 200
    # Errors are never conditional: a 404 stays a full problem document.
    missing = client.get("/api/v1/runs/nope", headers={**headers, "If-None-Match": etag})
    assert missing.status_code == 404 and "ETag" not in missing.headers


def test_a_changed_document_gets_a_new_etag(app, client):
    headers = {"X-API-Key": READER}
    before = client.get("/api/v1/runs", headers=headers).headers["ETag"]
    app.extensions["flowgate"].dispatcher.trigger_connector("numbers", {}, None, None, None)
    after = client.get("/api/v1/runs", headers={**headers, "If-None-Match": before})
    assert after.status_code == 200 and after.headers["ETag"] != before and len(after.json["items"]) == 1


def test_runs_filter_by_backend(app, client):
    svc = app.extensions["flowgate"]
    svc.dispatcher.trigger_connector("numbers", {}, None, None, None)
    headers = {"X-API-Key": READER}
    assert [r["backend"] for r in client.get("/api/v1/runs?backend=local", headers=headers).json["items"]] == ["local"]
    assert client.get("/api/v1/runs?backend=prefect", headers=headers).json["items"] == []
    refused = client.get("/api/v1/runs?backend=elsewhere", headers=headers)
    assert refused.status_code == 422 and refused.json["errors"][0]["field"] == "backend"
