"""Workflow node types: each is a config model and a function, registered with one decorator line.

    @node_type("shout", ShoutConfig)
    def shout(config: ShoutConfig, ctx: NodeContext) -> Any:
        return str(ctx.input).upper()
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from jsonpath_ng.exceptions import JsonPathParserError
from jsonpath_ng.ext import parse as parse_jsonpath
from pydantic import BaseModel, ConfigDict, Field

from connectors.failures import TERMINAL, TRANSIENT, classify
from connectors.outbound import OutboundPolicy, OutboundRefused, ResponseTooLarge, tls_context
from flows.llm import OfflineProvider, Provider, ProviderError
from flows.templates import DEFAULT_MAX_CHARS

# Runs a connector by id with params and a stop check; returns its load summary (the executor records it as a run).
ConnectorRunner = Callable[[str, dict[str, Any], Callable[[], bool]], dict[str, Any]]


class NodeFailed(RuntimeError):
    """A node attempt failed; `terminal` means a retry cannot help (bad config, refused host, 4xx), and
    `failure_class` says so in the words of connectors.failures (transient unless told otherwise)."""

    def __init__(self, message: str, *, code: str = "node_failed", terminal: bool = False,
                 failure_class: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.failure_class = failure_class or (TERMINAL if terminal else TRANSIENT)
        self.terminal = self.failure_class == TERMINAL


@dataclass
class Toolbox:
    """What nodes may use beyond their config: outbound HTTP, an LLM provider, a connector runner."""

    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)
    llm: Provider = field(default_factory=OfflineProvider)
    run_connector: ConnectorRunner | None = None
    http: httpx.Client = field(default_factory=lambda: httpx.Client(verify=tls_context(),
                                                                    limits=httpx.Limits(max_connections=64)))
    max_output_bytes: int = DEFAULT_MAX_CHARS  # a node's output, a rendered value, an http node's body
    max_delay_seconds: float = 3600.0


def make_toolbox(settings: Any, run_connector: ConnectorRunner | None = None) -> Toolbox:
    """The toolbox for flowgate's settings (FLOWGATE_HTTP_ALLOWED_HOSTS, FLOWGATE_LLM_*, FLOWGATE_MAX_OUTPUT_BYTES,
    FLOWGATE_MAX_DELAY_SECONDS)."""
    from flows.llm import OpenAICompatibleProvider

    provider: Provider = (OpenAICompatibleProvider(settings.llm_base_url, settings.llm_api_key, settings.llm_model)
                          if settings.llm_provider == "openai" else OfflineProvider())
    return Toolbox(outbound=OutboundPolicy.parse(settings.http_allowed_hosts), llm=provider,
                   run_connector=run_connector, max_output_bytes=settings.max_output_bytes,
                   max_delay_seconds=settings.max_delay_seconds)


@dataclass
class NodeContext:
    """One attempt of one node: its input, the workflow inputs, its live parents' outputs, stop and deadline."""

    node_id: str
    input: Any
    inputs: dict[str, Any]
    upstream: dict[str, Any]
    toolbox: Toolbox
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def remaining(self) -> float:
        """Seconds left of this attempt's timeout."""
        return max(self.deadline - time.monotonic(), 0.0)

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() >= self.deadline


class NodeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class NodeType:
    """A registered node type."""

    name: str
    config: type[NodeConfig]
    run: Callable[[Any, NodeContext], Any]


NODE_TYPES: dict[str, NodeType] = {}


def node_type(name: str, config: type[NodeConfig]) -> Callable[[Callable[[Any, NodeContext], Any]], Callable]:
    """Register `function(config, ctx) -> output` as the node type `name`."""

    def register(function: Callable[[Any, NodeContext], Any]) -> Callable[[Any, NodeContext], Any]:
        NODE_TYPES[name] = NodeType(name, config, function)
        return function

    return register


# --- the built-in types -------------------------------------------------------------------------


class TriggerConfig(NodeConfig):
    defaults: dict[str, Any] = Field(default_factory=dict, description="Inputs used when the caller leaves them out.")


@node_type("trigger", TriggerConfig)
def trigger(config: TriggerConfig, ctx: NodeContext) -> Any:
    """The workflow's inputs (over `defaults`): where a workflow starts."""
    return {**config.defaults, **ctx.inputs}


class HttpConfig(NodeConfig):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict, description="Query string parameters.")
    body: Any = Field(None, description="Sent as JSON when given.")
    timeout: float = Field(30.0, gt=0, le=300)
    raise_for_status: bool = Field(True, description="Fail the node on a 4xx/5xx answer (5xx and 429 are retried "
                                                     "when the node sets retries).")
    max_redirects: int = Field(5, ge=0, le=20)


@node_type("http", HttpConfig)
def http(config: HttpConfig, ctx: NodeContext) -> Any:
    """Call an allow-listed URL; output status, headers and body (parsed when JSON)."""
    kwargs: dict[str, Any] = {"headers": config.headers, "timeout": min(config.timeout, max(ctx.remaining, 0.001))}
    if config.body is not None:
        kwargs["json"] = config.body
    try:
        # `params` join the URL's own query string (httpx's params= would replace it).
        url = str(httpx.URL(config.url).copy_merge_params(config.params)) if config.params else config.url
        response = ctx.toolbox.outbound.request(ctx.toolbox.http, config.method, url,
                                                max_redirects=config.max_redirects,
                                                max_body_bytes=ctx.toolbox.max_output_bytes, **kwargs)
    except ResponseTooLarge as exc:
        raise NodeFailed(f"{config.method} {config.url}: {exc} (FLOWGATE_MAX_OUTPUT_BYTES)",
                         code="response_too_large", terminal=True) from None
    except httpx.InvalidURL as exc:
        raise NodeFailed(f"config.url: not a valid URL: {exc}", code="outbound_refused", terminal=True) from None
    except OutboundRefused as exc:
        raise NodeFailed(str(exc), code="outbound_refused", terminal=True) from None
    except httpx.TransportError as exc:
        failure = classify(exc)  # a refused connection may pass; a host that does not exist will not
        raise NodeFailed(f"{config.method} {config.url}: {type(exc).__name__}: {exc} ({failure.reason})",
                         code="http_error", failure_class=failure.failure_class) from None
    if config.raise_for_status and response.status_code >= 400:
        retryable = response.status_code in (408, 429) or response.status_code >= 500
        raise NodeFailed(f"{config.method} {config.url} answered HTTP {response.status_code}", code="http_status",
                         terminal=not retryable)
    try:
        body: Any = response.json() if "json" in response.headers.get("content-type", "") else response.text
    except ValueError:
        body = response.text
    return {"status": response.status_code, "headers": dict(response.headers), "body": body}


class TransformConfig(NodeConfig):
    value: Any = Field(None, description="The output, built with templates; the input when omitted.")
    jsonpath: dict[str, str] | None = Field(None, description="name -> JSONPath over `source`; output one value each.")
    source: Any = Field(None, description="What `jsonpath` reads; the node's input when omitted.")


@node_type("transform", TransformConfig)
def transform(config: TransformConfig, ctx: NodeContext) -> Any:
    """Build a value from templates, or pick values out of a document by JSONPath."""
    if config.jsonpath is None:
        return ctx.input if config.value is None else config.value
    source = ctx.input if config.source is None else config.source
    picked: dict[str, Any] = {}
    for name, expression in config.jsonpath.items():
        try:
            matches = [match.value for match in parse_jsonpath(expression).find(source)]
        except (JsonPathParserError, Exception) as exc:  # jsonpath-ng raises plain Exceptions on bad syntax
            raise NodeFailed(f"jsonpath.{name}: {expression!r} is not a valid JSONPath: {exc}", terminal=True) from None
        picked[name] = matches[0] if len(matches) == 1 else (matches or None)
    return picked if config.value is None else {"value": config.value, **picked}


class ConditionConfig(NodeConfig):
    value: Any = Field(description="Usually a template, e.g. '{{ inputs.score > 5 }}'.")


@node_type("condition", ConditionConfig)
def condition(config: ConditionConfig, ctx: NodeContext) -> Any:
    """Choose a branch: 'true'/'false' for a boolean, the value as text otherwise."""
    value = config.value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"
    branch = ("true" if value else "false") if isinstance(value, bool) or value is None else str(value)
    return {"branch": branch, "value": value}


class JoinConfig(NodeConfig):
    mode: Literal["object", "list", "merge"] = Field(
        "object", description="object: {node id: output}; list: outputs in order; merge: dict outputs merged.")


@node_type("join", JoinConfig)
def join(config: JoinConfig, ctx: NodeContext) -> Any:
    """Wait for every live parent and merge their outputs (parents on a branch not taken are left out)."""
    if config.mode == "list":
        return list(ctx.upstream.values())
    if config.mode == "merge":
        merged: dict[str, Any] = {}
        for node_id, output in ctx.upstream.items():
            if not isinstance(output, dict):
                raise NodeFailed(f"mode merge needs dict outputs; '{node_id}' gave {type(output).__name__}",
                                 terminal=True)
            merged.update(output)
        return merged
    return dict(ctx.upstream)


class DelayConfig(NodeConfig):
    seconds: float = Field(ge=0, le=3600)


@node_type("delay", DelayConfig)
def delay(config: DelayConfig, ctx: NodeContext) -> Any:
    """Wait, then pass the input on; a cancelled run or the node's timeout ends the wait."""
    if config.seconds > ctx.toolbox.max_delay_seconds:
        raise NodeFailed(f"config.seconds: {config.seconds:g} s is longer than the limit of "
                         f"{ctx.toolbox.max_delay_seconds:g} s (FLOWGATE_MAX_DELAY_SECONDS)", code="delay_too_long",
                         terminal=True)
    if ctx.cancelled.wait(min(config.seconds, ctx.remaining)):
        raise NodeFailed("delay interrupted", code="cancelled")
    if config.seconds > 0 and ctx.remaining <= 0:
        raise NodeFailed(f"timed out before the {config.seconds:g} s delay ended", code="timeout")
    return ctx.input


class ConnectorNodeConfig(NodeConfig):
    connector_id: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(default_factory=dict)


@node_type("connector", ConnectorNodeConfig)
def connector(config: ConnectorNodeConfig, ctx: NodeContext) -> Any:
    """Run a connector from connectors.yaml; output its load summary."""
    if ctx.toolbox.run_connector is None:
        raise NodeFailed("connectors cannot run here", terminal=True)
    return ctx.toolbox.run_connector(config.connector_id, config.params, ctx.should_stop)


class LlmConfig(NodeConfig):
    prompt: str = Field(min_length=1)
    system: str | None = None
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=100_000)


@node_type("llm", LlmConfig)
def llm(config: LlmConfig, ctx: NodeContext) -> Any:
    """Ask the configured provider (offline by default); output response, model, provider, usage."""
    try:
        completion = ctx.toolbox.llm.complete(config.prompt, system=config.system, model=config.model,
                                              temperature=config.temperature, max_tokens=config.max_tokens,
                                              timeout=max(ctx.remaining, 0.001))
    except ProviderError as exc:
        raise NodeFailed(str(exc), code="llm_error", terminal=not exc.retryable) from None
    return completion.to_dict()


class OutputConfig(NodeConfig):
    value: Any = Field(None, description="The workflow's output from this node; the input when omitted.")


@node_type("output", OutputConfig)
def output(config: OutputConfig, ctx: NodeContext) -> Any:
    """A result of the workflow: execution documents list every output node's value under `outputs`."""
    return ctx.input if config.value is None else config.value
