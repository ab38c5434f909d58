"""Typed settings for the gateway, read once from the environment at start-up."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(RuntimeError):
    """A setting or a configuration file is invalid; the message names what and where."""


class Settings(BaseSettings):
    """Everything flowgate reads from the environment, with defaults for a bare laptop."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    port: int = Field(5000, ge=1, le=65535, validation_alias=AliasChoices("FLOW_SERVER_PORT", "port"),
                      description="Port gunicorn binds to.")
    var_dir: Path = Field(Path("var"), validation_alias=AliasChoices("FLOWGATE_VAR_DIR", "var_dir"),
                          description="Folder for the SQLite run store, DuckDB files and dlt's working state.")
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "database_url"),
                                     description="Run store URL; unset means a SQLite file under var_dir.")
    connectors_file: Path = Field(Path("connectors.yaml"),
                                  validation_alias=AliasChoices("FLOWGATE_CONNECTORS", "connectors_file"),
                                  description="The YAML file that declares the connectors.")
    backend: Literal["auto", "local", "prefect"] = Field(
        "auto", validation_alias=AliasChoices("FLOWGATE_BACKEND", "backend"),
        description="Where runs execute: Prefect when it can take them (auto), or one path forced.")
    prefect_api_url: str | None = Field(None, validation_alias=AliasChoices("PREFECT_API_URL", "prefect_api_url"),
                                        description="Prefect server API, e.g. http://127.0.0.1:4200/api; "
                                                    "unset means every run executes locally.")
    prefect_api_key: str | None = Field(None, validation_alias=AliasChoices("PREFECT_API_KEY", "prefect_api_key"),
                                        description="Bearer token for a private Prefect server.", repr=False)
    prefect_pool: str = Field("flowgate", min_length=1,
                              validation_alias=AliasChoices("FLOWGATE_PREFECT_POOL", "prefect_pool"),
                              description="The process work pool the connector deployments use.")
    prefect_timeout_seconds: float = Field(
        2.0, gt=0, le=30, validation_alias=AliasChoices("FLOWGATE_PREFECT_TIMEOUT", "prefect_timeout_seconds"),
        description="Timeout of one call to Prefect's API.")
    executor_threads: int = Field(2, ge=0, le=64,
                                  validation_alias=AliasChoices("FLOWGATE_EXECUTOR_THREADS", "executor_threads"),
                                  description="Pipelines one gateway process runs at once (0: this process runs none).")
    reserved_slots: int = Field(1, ge=0, le=32,
                                validation_alias=AliasChoices("FLOWGATE_RESERVED_SLOTS", "reserved_slots"),
                                description="Executor slots per process that connectors keep from workflows and "
                                            "workflows from connectors (0: one shared pool).")
    lease_seconds: float = Field(30.0, gt=0.5, le=3600,
                                 validation_alias=AliasChoices("FLOWGATE_LEASE_SECONDS", "lease_seconds"),
                                 description="How long a claimed run stays owned without a heartbeat.")
    poll_seconds: float = Field(0.5, gt=0, le=60,
                                validation_alias=AliasChoices("FLOWGATE_POLL_SECONDS", "poll_seconds"),
                                description="How often an idle executor looks for queued runs.")
    max_body_bytes: int = Field(1_048_576, ge=1024,
                                validation_alias=AliasChoices("FLOWGATE_MAX_BODY_BYTES", "max_body_bytes"),
                                description="Largest request body accepted (413 above it).")
    max_wait_seconds: float = Field(300.0, ge=0, le=3600,
                                    validation_alias=AliasChoices("FLOWGATE_MAX_WAIT_SECONDS", "max_wait_seconds"),
                                    description="Longest a trigger may block with `wait`.")

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
    max_node_wait_seconds: float = Field(
        60.0, gt=0, le=600, validation_alias=AliasChoices("FLOWGATE_MAX_NODE_SECONDS", "max_node_wait_seconds"),
        description="Longest execute-node may run one node inside a request.")

    api_keys: str | None = Field(None, validation_alias=AliasChoices("FLOWGATE_API_KEYS", "api_keys"), repr=False,
                                 description="`<name>:<key>:<scopes>` entries, comma-separated; scopes read, "
                                             "trigger, admin joined by '+'. Unset (and no file): no authentication.")
    api_keys_file: Path | None = Field(None, validation_alias=AliasChoices("FLOWGATE_API_KEYS_FILE", "api_keys_file"),
                                       description="File of `<name> sha256:<digest> <scopes>` lines (keys hashed "
                                                   "at rest; `python -m app.auth hash <key>` prints a digest).")

    callback_secret: str | None = Field(None, validation_alias=AliasChoices("FLOWGATE_CALLBACK_SECRET",
                                                                           "callback_secret"), repr=False,
                                        description="HMAC-SHA256 key that signs run callbacks; unset: callbacks off.")
    callback_allowed_hosts: str = Field("", validation_alias=AliasChoices("FLOWGATE_CALLBACK_ALLOWED_HOSTS",
                                                                          "callback_allowed_hosts"),
                                        description="Hosts a callback_url may name, comma-separated, as for the "
                                                    "http node.")
    callback_max_attempts: int = Field(5, ge=1, le=20, validation_alias=AliasChoices(
        "FLOWGATE_CALLBACK_MAX_ATTEMPTS", "callback_max_attempts"), description="Deliveries tried per run.")
    callback_backoff_seconds: float = Field(2.0, gt=0, le=3600, validation_alias=AliasChoices(
        "FLOWGATE_CALLBACK_BACKOFF_SECONDS", "callback_backoff_seconds"),
        description="Wait before the second delivery; doubles after each failure.")

    rate_limit: str | None = Field(None, validation_alias=AliasChoices("FLOWGATE_RATE_LIMIT", "rate_limit"),
                                   description="Requests per caller (API key, else address), e.g. '600/minute' "
                                               "or '20/second;600/minute'; unset: no limit.")
    rate_limit_storage: str | None = Field(None, validation_alias=AliasChoices("FLOWGATE_RATE_LIMIT_STORAGE",
                                                                               "rate_limit_storage"), repr=False,
                                           description="Where counts live, shared by every process (redis://…); "
                                                       "unset: each process counts its own.")
    max_params_bytes: int = Field(16_384, ge=256, le=1_048_576,
                                  validation_alias=AliasChoices("FLOWGATE_MAX_PARAMS_BYTES", "max_params_bytes"),
                                  description="Largest `params` (or workflow `inputs`) as JSON.")
    max_queued_per_target: int = Field(100, ge=1, le=100_000, validation_alias=AliasChoices(
        "FLOWGATE_MAX_QUEUED_PER_TARGET", "max_queued_per_target"),
        description="Queued runs one connector or workflow may have; more triggers get 429.")
    run_timeout_seconds: float = Field(
        6 * 3600, gt=0, le=7 * 86400, validation_alias=AliasChoices("FLOWGATE_RUN_TIMEOUT_SECONDS",
                                                                    "run_timeout_seconds"),
        description="A run still unfinished this long after it started (Prefect: was created) is ended as failed.")

    max_output_bytes: int = Field(
        1_048_576, ge=1024, le=1_073_741_824, validation_alias=AliasChoices("FLOWGATE_MAX_OUTPUT_BYTES",
                                                                           "max_output_bytes"),
        description="Largest workflow node output, run result, rendered template value and http-node response "
                    "body (bytes); past it the node or run fails naming this limit.")
    max_delay_seconds: float = Field(
        300.0, ge=0, le=3600, validation_alias=AliasChoices("FLOWGATE_MAX_DELAY_SECONDS", "max_delay_seconds"),
        description="Longest a workflow `delay` node may wait.")
    max_concurrent_waits: int = Field(
        4, ge=0, le=1000, validation_alias=AliasChoices("FLOWGATE_MAX_CONCURRENT_WAITS", "max_concurrent_waits"),
        description="Requests one gateway process lets block on `wait` / `Prefer: wait` at once; beyond it a "
                    "trigger answers 202 at once (keep it below GUNICORN_THREADS so /health always has a thread).")
    auth_failure_limit: str = Field(
        "10/minute", validation_alias=AliasChoices("FLOWGATE_AUTH_FAILURE_LIMIT", "auth_failure_limit"),
        description="Failed authentications allowed per client address (e.g. '10/minute'); past it every request "
                    "from that address is a 429 until the window passes. Shared like FLOWGATE_RATE_LIMIT_STORAGE.")

    @field_validator("auth_failure_limit")
    @classmethod
    def _parseable_auth_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '10/minute': {exc}") from None
        return value

    @field_validator("rate_limit")
    @classmethod
    def _parseable_limit(cls, value: str | None) -> str | None:
        if value:
            from limits import parse_many

            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"not a rate limit like '600/minute': {exc}") from None
        return value

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


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Read the settings from the environment (and overrides), or stop with a message naming the variable."""
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        names = {name: field.validation_alias.choices[0] for name, field in Settings.model_fields.items()}
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{names.get(field, field)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
