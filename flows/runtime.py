"""The settings the pipelines and the workflow runtime read, wherever they run (gateway or Prefect worker)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    """What a connector or workflow run needs from the environment: files, folders, the run store, outbound
    hosts, the LLM provider. The gateway's Settings extend these; a Prefect flow reads only these."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    var_dir: Path = Field(Path("var"), validation_alias=AliasChoices("FLOWGATE_VAR_DIR", "var_dir"),
                          description="Folder for the SQLite run store, DuckDB files and dlt's working state.")
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "database_url"),
                                     description="Run store URL; unset means a SQLite file under var_dir.")
    connectors_file: Path = Field(Path("connectors.yaml"),
                                  validation_alias=AliasChoices("FLOWGATE_CONNECTORS", "connectors_file"),
                                  description="The YAML file that declares the connectors.")
    workflows_dir: Path = Field(Path("workflows"), validation_alias=AliasChoices("FLOWGATE_WORKFLOWS", "workflows_dir"),
                                description="Folder of workflow YAML files (one workflow per file).")
    http_allowed_hosts: str = Field("", validation_alias=AliasChoices("FLOWGATE_HTTP_ALLOWED_HOSTS",
                                                                      "http_allowed_hosts"),
                                    description="Hosts the workflow `http` node may call, comma-separated "
                                                "(`api.example.com`, `*.example.com`, `127.0.0.1:8080`); "
                                                "empty: none.")
    llm_provider: Literal["offline", "openai"] = Field(
        "offline", validation_alias=AliasChoices("FLOWGATE_LLM_PROVIDER", "llm_provider"),
        description="The `llm` node's provider: offline (deterministic, no network) or an OpenAI-compatible API.")
    llm_base_url: str = Field("https://api.openai.com/v1",
                              validation_alias=AliasChoices("FLOWGATE_LLM_BASE_URL", "llm_base_url"),
                              description="Base URL of the OpenAI-compatible API (…/v1).")
    llm_api_key: str | None = Field(None, validation_alias=AliasChoices("FLOWGATE_LLM_API_KEY", "llm_api_key"),
                                    description="Bearer key of the LLM API.", repr=False)
    llm_model: str = Field("gpt-4o-mini", min_length=1, validation_alias=AliasChoices("FLOWGATE_LLM_MODEL", "llm_model"),
                           description="Model used when a node names none.")
    max_output_bytes: int = Field(
        1_048_576, ge=1024, le=1_073_741_824, validation_alias=AliasChoices("FLOWGATE_MAX_OUTPUT_BYTES",
                                                                           "max_output_bytes"),
        description="Largest workflow node output, run result, rendered template value and http-node response "
                    "body (bytes); past it the node or run fails naming this limit.")
    max_delay_seconds: float = Field(
        300.0, ge=0, le=3600, validation_alias=AliasChoices("FLOWGATE_MAX_DELAY_SECONDS", "max_delay_seconds"),
        description="Longest a workflow `delay` node may wait.")

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
