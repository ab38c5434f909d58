"""The settings the pipelines and the workflow runtime read, wherever they run (gateway or Prefect worker)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field

from connectors.outbound import OutboundPolicy
from connectors.pipeline import Workspace
from connectors.registry import RegistrySettings


class RuntimeSettings(RegistrySettings):
    """What a connector or workflow run needs from the environment: files, folders, the run store, outbound
    hosts, the LLM provider. The gateway's Settings extend these; a Prefect flow reads only these. Each is read from
    FLOWGATE_<its name> unless its field names another variable (RegistrySettings says why)."""

    var_dir: Path = Field(Path("var"),
                          description="Folder for the SQLite run store (flowgate.db), DuckDB files (duckdb/), dlt's "
                                      "working state (dlt/) and gunicorn's metrics files (prometheus-multiproc/, "
                                      "emptied at every start); make stack keeps Prefect's home in prefect/.")
    database_url: str | None = Field(
        None, validation_alias="DATABASE_URL",
        description="The run store's SQLAlchemy URL, e.g. `postgresql+psycopg://user@host/db`; unset: "
                    "`sqlite:///<FLOWGATE_VAR_DIR, absolute>/flowgate.db`.")
    workflows_dir: Path = Field(Path("workflows"), validation_alias="FLOWGATE_WORKFLOWS",
                                description="Folder of workflow YAML files (one workflow per file).")
    http_allowed_hosts: str = Field("",
                                    description="Hosts the workflow `http` node and the rest_api connectors (each "
                                                "page, each redirect) may call, comma-separated "
                                                "(`api.example.com`, `*.example.com`, `127.0.0.1:8080`); "
                                                "empty: none.")
    llm_provider: Literal["offline", "openai"] = Field(
        "offline",
        description="The `llm` node's provider: offline (deterministic, no network) or openai (any "
                    "OpenAI-compatible /chat/completions API).")
    llm_base_url: str = Field("https://api.openai.com/v1",
                              description="Base URL of the OpenAI-compatible API (…/v1).")
    llm_api_key: str | None = Field(None,
                                    description="Bearer key of the LLM API.", repr=False)
    llm_model: str = Field("gpt-4o-mini", min_length=1,
                           description="Model used when a node names none.")
    max_output_bytes: int = Field(
        1_048_576, ge=1024, le=1_073_741_824,
        description="Largest workflow node output, run result, rendered template value and http-node response "
                    "body (bytes); past it the node or run fails naming this limit.")
    max_delay_seconds: float = Field(
        300.0, ge=0, le=3600,
        description="Longest a workflow `delay` node may wait.")

    lease_seconds: float = Field(
        30.0, gt=0.5, le=3600,
        description="How long a claimed run stays owned without a renewal (a local run's, and a Prefect flow run's "
                    "on its run: give workers the gateways' value). Renewals go every third of it (a cancel is heard "
                    "then); a process none got through for two thirds of it stops the run.")

    def secret_values(self) -> list[str]:
        """The values of these settings that are secrets (a key, a URL's password), for connectors.secrets to
        scrub: an upstream that echoes its Authorization header must not pass the key on to a caller."""
        return [value for value in (self.llm_api_key, url_password(self.database_url)) if value]

    @property
    def run_store_url(self) -> str:
        """The SQLAlchemy URL of the run store."""
        return self.database_url or f"sqlite:///{(self.var_dir / 'flowgate.db').resolve()}"

    @property
    def duckdb_dir(self) -> Path:
        """Where each connector's DuckDB file lives unless its destination names a path."""
        return (self.var_dir / "duckdb").resolve()

    @property
    def pipelines_dir(self) -> Path:
        """dlt's working directory (pipeline state, pending load packages)."""
        return (self.var_dir / "dlt").resolve()

    @property
    def workspace(self) -> Workspace:
        """Where connector runs keep their state, and the hosts their sources may call."""
        return Workspace(self.pipelines_dir, self.duckdb_dir, OutboundPolicy.parse(self.http_allowed_hosts))


def url_password(url: str | None) -> str | None:
    """The password in `url` (`scheme://user:password@host/…`), percent-decoded; None without one."""
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:  # a malformed port or netloc: the URL's own reader names the problem
        return None
    return unquote(password) if password else None
