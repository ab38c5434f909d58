"""Typed settings for the gateway, read once from the environment at start-up."""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from flows.runtime import RuntimeSettings, url_password

# Where docs/operations.md holds reference_table()'s output (tests/test_docs.py keeps the two equal).
REFERENCE_BEGIN, REFERENCE_END = "<!-- settings:begin -->", "<!-- settings:end -->"


class ConfigError(RuntimeError):
    """A setting or a configuration file is invalid; the message names what and where."""


class Settings(RuntimeSettings):
    """Everything the gateway reads from the environment, with defaults for a bare laptop: the runtime's
    settings (flows.runtime) and the gateway's own."""

    port: int = Field(5000, ge=1, le=65535, validation_alias="FLOW_SERVER_PORT",
                      description="Port gunicorn binds to.")
    host: str = Field("127.0.0.1", min_length=1,
                      description="Address gunicorn binds to (the Docker image sets 0.0.0.0). Without API keys a "
                                  "non-loopback address is narrowed to 127.0.0.1, unless "
                                  "FLOWGATE_ALLOW_UNAUTHENTICATED.")
    bind: str | None = Field(None,
                             description="The whole bind address (host:port, or unix:path), instead of FLOWGATE_HOST "
                                         "and FLOW_SERVER_PORT.")
    allow_unauthenticated: bool = Field(
        False,
        description="Serve beyond loopback without API keys (otherwise a keyless gateway binds 127.0.0.1 only); "
                    "true/false, 1/0, yes/no or on/off.")
    server_names: str = Field(
        "",
        description="Without API keys, the host names (comma-separated; `*.example.com` for the names under one) "
                    "the gateway answers to besides `localhost`, `*.localhost` and IP addresses: a request whose "
                    "Host is another name is a 421 (a DNS-rebinding page). Unused with keys.")
    keepalive_seconds: int = Field(
        75, ge=0, le=3600,
        description="Seconds gunicorn keeps an idle connection open: keep it above the idle timeout of every "
                    "client pool and load balancer in front (docs/api.md, Calling from Spring).")
    log_format: Literal["json", "text"] = Field(
        "json",
        description="json: one JSON object per line on stdout, gunicorn's lines and access log included. text: "
                    "gunicorn's own lines in its plain format, while flowgate's own lines stay JSON.")
    backend: Literal["auto", "local", "prefect"] = Field(
        "auto",
        description="Where runs execute: Prefect when it can take them, else locally (auto), or one path forced "
                    "(local, prefect); a trigger's `backend` overrides it.")
    prefect_api_url: str | None = Field(None, validation_alias="PREFECT_API_URL",
                                        description="Prefect server API, e.g. `http://127.0.0.1:4200/api`; "
                                                    "unset means every run executes locally.")
    prefect_api_key: str | None = Field(None, validation_alias="PREFECT_API_KEY",
                                        description="Bearer token for a private Prefect server.", repr=False)
    prefect_pool: str = Field("flowgate", min_length=1,
                              description="The process work pool of the deployments (make deploy creates it if "
                                          "missing).")
    prefect_pickup_seconds: float = Field(
        30.0, gt=0, le=86400,
        description="A run handed to Prefect that no worker has picked up this long after is taken back from "
                    "Prefect (its flow run cancelled) and runs locally, under the same run id "
                    "(prefect_not_picked_up).")
    prefect_start_seconds: float = Field(
        300.0, gt=0, le=86400,
        description="A flow run a Prefect worker claimed (Pending) that has not started running this long after (its "
                    "worker died or froze, or the Prefect server lost the submission) is taken back and runs "
                    "locally, under the same run id (prefect_not_started); keep it well above a flow run's start "
                    "(a process and its imports: seconds).")
    prefect_worker_max_age_seconds: float = Field(
        65.0, gt=0, le=3600,
        description="A Prefect worker whose last heartbeat is older than this counts as gone: keep it above two "
                    "of the workers' PREFECT_WORKER_HEARTBEAT_SECONDS (30 s by default; make stack uses 15 s and "
                    "sets this to 35).")
    prefect_timeout_seconds: float = Field(
        2.0, gt=0, le=30, validation_alias="FLOWGATE_PREFECT_TIMEOUT",
        description="Seconds one call to Prefect's API may take.")
    executor_threads: int = Field(
        2, ge=0, le=64,
        description="Runs one gateway process executes at once, connectors and workflows together; each kind may "
                    "take at most this less FLOWGATE_RESERVED_SLOTS (with the defaults, one connector and one "
                    "workflow). 0: this process accepts triggers but runs none.")
    reserved_slots: int = Field(1, ge=0, le=32,
                                description="Executor slots per process that connectors keep from workflows and "
                                            "workflows from connectors (0, or no more slots than this: one shared "
                                            "pool).")
    schedule_slots: int = Field(
        1, ge=0, le=32,
        description="Executor slots per process, on top of FLOWGATE_EXECUTOR_THREADS, that only scheduled runs take: "
                    "a schedule's slot starts on time while triggers keep every other slot busy. 0: scheduled runs "
                    "share the slots (still claimed before triggered ones). A process with no executor threads runs "
                    "none.")
    poll_seconds: float = Field(0.5, gt=0, le=60,
                                description="How often an idle executor looks for queued runs.")
    max_body_bytes: int = Field(1_048_576, ge=1024,
                                description="Largest request body accepted, in bytes (413 above it).")
    max_wait_seconds: float = Field(
        300.0, ge=0, le=3600,
        description="Longest a trigger or execute may block with `wait` (a larger one is a 422; `Prefer: wait` is "
                    "capped at it).")
    max_node_wait_seconds: float = Field(
        60.0, gt=0, le=600, validation_alias="FLOWGATE_MAX_NODE_SECONDS",
        description="Largest `timeout` of a node sent to execute-node (a larger one is a 422). Nodes default "
                    "to 60 s, so below 60 every node without its own `timeout` is refused.")
    api_keys: str | None = Field(None, repr=False,
                                 description="`<name>:<key>:<scopes>` entries, comma-separated; scopes read, "
                                             "trigger, admin joined by '+'. Unset (and no file): no authentication.")
    api_keys_file: Path | None = Field(None,
                                       description="File of `<name> sha256:<digest> <scopes>` lines (keys hashed "
                                                   "at rest; `python -m app keys hash <key>` prints a digest).")
    callback_secret: str | None = Field(None, repr=False,
                                        description="HMAC-SHA256 key that signs run callbacks; unset: callbacks off "
                                                    "(a callback_url is a 422).")
    callback_allowed_hosts: str = Field("",
                                        description="Hosts a callback_url may name, comma-separated, as for the "
                                                    "http node.")
    callback_max_attempts: int = Field(5, ge=1, le=20,
                                       description="Deliveries tried per run (each times out after 10 s).")
    callback_backoff_seconds: float = Field(2.0, gt=0, le=3600,
        description="Wait before the second delivery; doubles after each failure.")
    rate_limit: str | None = Field(None,
                                   description="Requests per caller (API key name, else address), e.g. '600/minute' "
                                               "or '20/second;600/minute', 429 past it; /health and the dashboard's "
                                               "files are exempt. Unset: no limit.")
    rate_limit_storage: str | None = Field(None, repr=False,
                                           description="Where counts live, shared by every process (redis://…); "
                                                       "unset: each process counts its own.")
    max_params_bytes: int = Field(16_384, ge=256, le=1_048_576,
                                  description="Largest `params`, workflow `inputs` or execute-node `inputData`, "
                                              "in bytes as JSON (422 above it).")
    max_queued_per_target: int = Field(100, ge=1, le=100_000,
        description="Queued runs one connector or workflow may have (every inline workflow counts as one); "
                    "more triggers get 429 (queue_full).")
    run_timeout_seconds: float = Field(
        6 * 3600, gt=0, le=7 * 86400,
        description="A run still unfinished this long after it started (or, never started, was created) is ended "
                    "as failed (run_timeout).")
    retention_days: float = Field(
        30.0, ge=0, le=36_500,
        description="Ended runs (with their log lines, node states, callback and idempotency key) older than this "
                    "are deleted; 0 keeps them forever.")
    retention_interval_seconds: float = Field(
        3600.0, ge=1, le=7 * 86400,
        description="How often a gateway process prunes (one process at a time across the store).")
    retention_batch_size: int = Field(
        500, ge=1, le=100_000,
        description="Runs deleted per transaction while pruning; small batches keep the write lock short.")

    schedule_grace_seconds: float = Field(
        60.0, gt=0, le=86400,
        description="How late a schedule's slot may be and still run under `catch_up: none`; a later one (no "
                    "gateway ran at its time) is counted missed.")

    max_concurrent_waits: int = Field(
        4, ge=0, le=1000,
        description="Requests one gateway process lets block on `wait` / `Prefer: wait` at once; beyond it a "
                    "trigger answers 202 at once (keep it below GUNICORN_THREADS so /health always has a thread).")
    max_concurrent_inline: int = Field(
        2, ge=0, le=1000,
        description="execute-node and preview calls one gateway process runs at once inside their request (each "
                    "holds a request thread); beyond it they are a 429 (inline_slots_full) with Retry-After. Keep it "
                    "and FLOWGATE_MAX_CONCURRENT_WAITS together below GUNICORN_THREADS. 0: both are always refused.")
    preview_timeout_seconds: float = Field(
        30.0, gt=0, le=600,
        description="Longest a preview's source may take to give its sample; past it the preview's process is killed "
                    "and the call is a 504 (preview_timeout).")
    auth_failure_limit: str = Field(
        "10/minute",
        description="Failed authentications allowed per client address (e.g. '10/minute'); past it a request "
                    "from that address without a right key is a 429 until the window passes (a right key is "
                    "always served). Shared like FLOWGATE_RATE_LIMIT_STORAGE.")
    trusted_proxies: int = Field(
        0, ge=0, le=5,
        description="How many proxies in front of the gateway append to X-Forwarded-For (docker-compose.yml's "
                    "nginx: 1); the client address is then the one the outermost of them saw. 0: the header "
                    "is ignored, as any client could write it.")

    def secret_values(self) -> list[str]:
        """The runtime's secrets, Prefect's key, the callback secret, every plain API key and the rate-limit
        store's password."""
        api_keys = [entry.split(":")[1] for entry in (self.api_keys or "").split(",") if entry.count(":") == 2]
        more = (self.prefect_api_key, self.callback_secret, *api_keys, url_password(self.rate_limit_storage))
        return [*super().secret_values(), *(value for value in more if value)]

    @cached_property  # every run's answer shows paths relative to it: resolved once, not a syscall per part each time
    def project_dir(self) -> Path:
        """The folder of connectors.yaml: what relative paths in it are relative to, and what answers show paths
        relative to (connectors.shown_paths)."""
        return self.connectors_file.resolve().parent

    @property
    def server_name_list(self) -> tuple[str, ...]:
        """FLOWGATE_SERVER_NAMES as lower-case names."""
        return tuple(name.strip().lower().rstrip(".") for name in self.server_names.split(",") if name.strip())

    @field_validator("server_names")
    @classmethod
    def _host_names(cls, value: str) -> str:
        for name in (n.strip() for n in value.split(",") if n.strip()):
            bare = name[2:] if name.startswith("*.") else name
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?",
                                bare):
                raise ValueError(f"{name!r} is not a host name (or *.<host name>)")
        return value

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


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Read the settings from the environment (and overrides), or stop with a message naming the variable."""
    try:
        return Settings.of(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError("invalid settings: " + Settings.problems(exc)) from None


def reference_table() -> str:
    """The configuration reference: one Markdown row per setting (its variable, default and description), by
    variable; `python -m app settings reference` prints it."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for variable, field in sorted(((Settings.env_name(name), field) for name, field in Settings.model_fields.items()),
                                  key=lambda row: row[0]):
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{variable}` | {_shown_default(field)} | {description} |")
    return "\n".join(rows) + "\n"


def with_reference_table(document: str, table: str) -> str:
    """`document` with `table` between its REFERENCE_BEGIN and REFERENCE_END markers (ValueError without them)."""
    start, end = document.find(REFERENCE_BEGIN), document.find(REFERENCE_END)
    if start < 0 or end < start:
        raise ValueError(f"no {REFERENCE_BEGIN} ... {REFERENCE_END} markers")
    return document[:start + len(REFERENCE_BEGIN)] + "\n" + table + document[end:]


def _shown_default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"
