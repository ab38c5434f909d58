"""Secrets never reach a caller or a log reader: `${VAR}` values scrubbed everywhere (issue 16, item 2), and
redaction by name over the field names real APIs use (item 3)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from app import create_app
from app.logs import ContextFilter, JsonLines
from connectors import secrets
from connectors.secrets import is_secret_name, redact, redact_text
from flows.runtime import RuntimeSettings
from tests.support.fake_services import EchoService, FakeOpenAI
from tests.support.waiting import wait_until_ended

WF_SECRET = "wf-s3cret-9f8e7d6c"


class Capture(logging.Handler):
    """Every record as the JSON formatter writes it to stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.addFilter(ContextFilter())
        self.setFormatter(JsonLines())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def stdout_lines():
    handler = Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture
def echo():
    service = EchoService()
    service.failures = 1000  # /flaky answers 500 throughout
    yield service
    service.stop()



def everything_a_reader_sees(client, run_id: str) -> str:
    """The run document, the execution document and the run's logs, as text."""
    return "\n".join(client.get(path).get_data(as_text=True) for path in (
        f"/api/v1/runs/{run_id}", f"/api/workflow/execution/{run_id}", f"/api/v1/runs/{run_id}/logs",
        "/api/v1/runs?limit=5"))


@pytest.mark.parametrize("inputs", [{"path": "flaky"}, {}], ids=["http-500", "template-error"])
def test_a_workflow_files_resolved_secret_never_reaches_a_reader(app_config, monkeypatch, echo, stdout_lines, inputs):
    monkeypatch.setenv("WF_SECRET", WF_SECRET)
    app_config["workflows_dir"].mkdir()
    (app_config["workflows_dir"] / "leaky.yaml").write_text(
        "nodes:\n"
        f"  - {{id: call, type: http, config: {{url: 'http://127.0.0.1:{echo.port}/{{{{ inputs.path }}}}"
        "?key=${WF_SECRET}'}}\n")
    app = create_app({**app_config, "http_allowed_hosts": f"127.0.0.1:{echo.port}"})
    app.extensions["flowgate"].start()
    try:
        client = app.test_client()
        run_id = client.post("/api/workflow/leaky/execute", json={"inputs": inputs}).json["executionId"]
        doc = wait_until_ended(client, f"/api/v1/runs/{run_id}")
        assert doc["status"] == "failed"
        seen = everything_a_reader_sees(client, run_id)
        assert "key=***" in seen  # the failure is still explained
        assert WF_SECRET not in seen
        assert not any(WF_SECRET in line for line in stdout_lines)
        if inputs:
            assert echo.requests[-1]["query"] == {"key": WF_SECRET}  # the node itself did use the secret
    finally:
        app.extensions["flowgate"].stop(timeout=10)
        app.extensions["flowgate"].store.dispose()


# Field names seen in real configs: headers, query parameters, connection-string keys, dlt auth fields.
SECRET_NAMES = [
    "password", "Password", "passwd", "pwd", "db_pass", "passphrase", "secret", "client_secret", "SECRET_KEY",
    "token", "access_token", "refresh_token", "id_token", "X-Auth-Token", "x-amz-security-token", "session_token",
    "api_key", "apiKey", "apikey", "X-API-Key", "x-api-key", "Api-Key", "X-Auth", "X-Custom-Auth", "auth",
    "Authorization", "Proxy-Authorization", "Ocp-Apim-Subscription-Key", "key", "access_key", "AccessKeyId",
    "aws_secret_access_key", "AccountKey", "SharedAccessKey", "SharedAccessSignature", "sig", "signature",
    "X-Hub-Signature", "private_key", "private_key_id", "credentials", "Cookie", "Set-Cookie", "bearer",
    "sessionid", "jwt", "dsn",
]
PLAIN_NAMES = [
    "name", "url", "host", "port", "username", "user", "tables", "primary_key", "merge_key", "cursor_path",
    "token_url", "api_key_name", "max_tokens", "total_tokens", "author", "keyword", "type", "location",
    "Content-Type", "Accept", "User-Agent", "page", "limit", "since", "write_disposition", "file_glob",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_secret_field_name_is_recognised(name: str):
    assert is_secret_name(name)
    assert redact({name: "v4lue-x"}) == {name: "***"}


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_an_ordinary_field_name_is_left_alone(name: str):
    assert not is_secret_name(name)
    assert redact({name: "v4lue-x"}) == {name: "v4lue-x"}


@pytest.mark.parametrize("text, expected", [
    ("https://api.example.com/items?page=2&password=hunter2", "https://api.example.com/items?page=2&password=***"),
    ("https://api.example.com/v1/apikey=abc123/items", "https://api.example.com/v1/apikey=***/items"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=AbC%2Bd&se=2030", "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=2030"),
    ("Server=db;User Id=sa;Password=S3cret!;Database=x", "Server=db;User Id=sa;Password=***;Database=x"),
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=zz+y==;EndpointSuffix=core.windows.net",
     "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;EndpointSuffix=core.windows.net"),
    ("postgresql://loader:pw@db:5432/shop", "postgresql://loader:***@db:5432/shop"),
    ("Bearer eyJhbGciOi.x.y", "Bearer ***"),
    ("https://api.example.com/items?page=2", "https://api.example.com/items?page=2"),
])
def test_secrets_inside_strings_are_redacted(text: str, expected: str):
    assert redact_text(text) == expected


def test_a_rest_api_connectors_headers_params_and_urls_are_redacted(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CUSTOM_HEADER_VALUE", "cust0m-h3ader-value")
    (tmp_path / "c.yaml").write_text("""
connectors:
  api:
    source:
      kind: rest_api
      config:
        client:
          base_url: "https://api.example.com/v1/apikey=path-s3cret/?password=query-s3cret"
          headers: {X-API-Key: h1-s3cret, Api-Key: h2-s3cret, X-Auth: h3-s3cret, X-Custom-Auth: h4-s3cret,
                    Ocp-Apim-Subscription-Key: h5-s3cret, X-Tenant: "${CUSTOM_HEADER_VALUE}", Accept: application/json}
        resources:
          - name: items
            endpoint: {path: items, params: {access_key: p1-s3cret, sig: p2-s3cret, key: p3-s3cret, page_size: 50}}
""")
    app = create_app({"var_dir": tmp_path / "var", "connectors_file": tmp_path / "c.yaml",
                      "workflows_dir": tmp_path / "workflows"})
    body = app.test_client().get("/api/v1/connectors/api")
    text = body.get_data(as_text=True)
    for secret in ("path-s3cret", "query-s3cret", "h1-s3cret", "h2-s3cret", "h3-s3cret", "h4-s3cret", "h5-s3cret",
                   "p1-s3cret", "p2-s3cret", "p3-s3cret", "cust0m-h3ader-value"):
        assert secret not in text, secret
    config = body.json["spec"]["source"]["config"]
    # `${VAR}` values are secrets by construction, whatever the field is called.
    assert config["client"]["headers"]["X-Tenant"] == "***"
    assert config["client"]["headers"]["Accept"] == "application/json"
    assert config["resources"][0]["endpoint"]["params"]["page_size"] == 50
    assert config["client"]["base_url"] == "https://api.example.com/v1/apikey=***/?password=***"
    app.extensions["flowgate"].store.dispose()


def test_a_log_line_carrying_a_resolved_secret_is_scrubbed(tmp_path: Path, monkeypatch, stdout_lines):
    from connectors import secrets

    secrets.remember("l0g-line-s3cret")
    try:
        raise RuntimeError("failed calling https://x/?key=l0g-line-s3cret")
    except RuntimeError:
        logging.getLogger("flows.test").exception("boom with %s", "l0g-line-s3cret")
    line = json.loads(stdout_lines[-1])
    assert "l0g-line-s3cret" not in stdout_lines[-1]
    assert line["message"] == "boom with ***" and "key=***" in line["exc_info"]


LLM_KEY = "sk-llm-SECRET-0123456789"


def test_the_settings_secrets_are_remembered_when_the_app_is_built(app_config):
    app = create_app({**app_config, "llm_api_key": LLM_KEY, "prefect_api_key": "pf-key-0123456789",
                      "callback_secret": "cb-secret-0123456789", "api_keys": "ops:ops-key-0123456789abc:read",
                      "rate_limit_storage": "redis://:redis-pass-0123@127.0.0.1:6379/0"})
    for value in (LLM_KEY, "pf-key-0123456789", "cb-secret-0123456789", "ops-key-0123456789abc", "redis-pass-0123"):
        assert value in secrets.known()
    app.extensions["flowgate"].store.dispose()


def test_a_database_urls_password_is_a_secret_of_the_runtime():
    settings = RuntimeSettings.of(database_url="postgresql+psycopg://flow:p%40ss-word-1@db/flowgate", llm_api_key=None)
    assert settings.secret_values() == ["p@ss-word-1"]


def test_an_llm_upstream_echoing_the_key_passes_it_to_no_caller(app_config, stdout_lines):
    upstream = FakeOpenAI(api_key="the-right-key")
    try:
        app = create_app({**app_config, "llm_provider": "openai", "llm_base_url": upstream.url + "/v1",
                          "llm_api_key": LLM_KEY})
        answer = app.test_client().post("/api/workflow/any/execute-node", json={
            "nodeId": "ask", "nodeType": "llm", "node": {"config": {"prompt": "hi"}}, "inputData": {}})
        app.extensions["flowgate"].store.dispose()
    finally:
        upstream.stop()
    assert answer.status_code == 200 and answer.json["success"] is False
    assert "HTTP 401" in answer.json["error"]["message"]
    assert LLM_KEY not in answer.get_data(as_text=True)
    assert not [line for line in stdout_lines if LLM_KEY in line]
