"""The workflow engine: layers of a DAG run in parallel (or one node at a time), with templates, branches,
retries, timeouts and a result cache. Plain code: the local executor and the Prefect flow both call it.
Over 300 lines because one execution's parts (scheduling, one node's attempts, cancellation) share its state."""
from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from connectors import tracing
from connectors.failures import TRANSIENT, classify
from connectors.nesting import MAX_OUTPUT_DEPTH, NestedTooDeep, check_depth
from connectors.secrets import scrub
from flows.nodes import NODE_TYPES, NodeContext, NodeFailed, Toolbox
from flows.templates import RenderBudget, TemplateFailed, render
from flows.workflow_spec import Mode, NodeSpec, WorkflowSpec

log = logging.getLogger(__name__)

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
SKIPPED, UPSTREAM_FAILED, CANCELLED = "skipped", "upstream_failed", "cancelled"
NODE_ENDED = (COMPLETED, FAILED, SKIPPED, UPSTREAM_FAILED, CANCELLED)


@dataclass
class NodeResult:
    """One node of one execution: status, timing, attempts, output or error."""

    id: str
    type: str
    layer: int
    status: str = PENDING
    attempts: int = 0
    cached: bool = False
    reused: bool = False  # a rerun from the failed nodes took this completed node's output from the run it reruns
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None
    output: Any = None
    error: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ISO timestamps; `${VAR}` secrets a node came across are scrubbed (connectors.secrets)."""
        data = asdict(self)
        data["output"], data["error"] = scrub(data["output"]), scrub(data["error"])
        for key in ("started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass
class WorkflowResult:
    """A whole execution: its status, every node, and the values of its output nodes."""

    workflow_id: str
    mode: str
    status: str
    layers: list[list[str]]
    nodes: dict[str, NodeResult]
    duration_seconds: float
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_nodes(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.status == FAILED]

    def to_dict(self) -> dict[str, Any]:
        return {"workflow_id": self.workflow_id, "mode": self.mode, "status": self.status, "layers": self.layers,
                "duration_seconds": self.duration_seconds, "outputs": scrub(self.outputs),
                "nodes": [node.to_dict() for node in self.nodes.values()]}


class NodeCache(Protocol):
    """Outputs by key with a time to live; the run store's implementation is shared by every process."""

    def get(self, key: str) -> tuple[bool, Any]: ...

    def put(self, key: str, node_type: str, output: Any, ttl_seconds: float) -> None: ...


class NodeObserver(Protocol):
    """Told each time a node changes status (the local executor writes it to the run store)."""

    def __call__(self, result: NodeResult) -> None: ...


# Runs `work` for one node and returns a future of its NodeResult: a thread pool here, a Prefect task in flows/.
Submit = Callable[[NodeSpec, Callable[[], NodeResult]], "Future[NodeResult] | Any"]


def cache_key(node_type: str, config: dict[str, Any], node_input: Any) -> str:
    """The cache key: node type + resolved config + input."""
    body = json.dumps([node_type, config, node_input], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


class WorkflowEngine:
    """Runs workflows and single nodes with one Toolbox; cache and observer are optional."""

    def __init__(self, toolbox: Toolbox, cache: NodeCache | None = None):
        self.toolbox = toolbox
        self.cache = cache

    # --- a whole workflow -----------------------------------------------------------------------

    def run(self, spec: WorkflowSpec, inputs: dict[str, Any], mode: Mode = "optimized",
            observe: NodeObserver = lambda result: None, should_stop: Callable[[], bool] = lambda: False,
            submit: Submit | None = None, reuse: dict[str, Any] | None = None) -> WorkflowResult:
        """Run every node; `optimized` runs each layer's nodes in parallel, `legacy` one at a time in order.
        A node in `reuse` (node id -> output: a rerun from the failed nodes) completes with that output, unexecuted."""
        reuse = reuse or {}
        started = time.monotonic()
        layers = spec.layers()
        layer_of = {node_id: index for index, layer in enumerate(layers) for node_id in layer}
        results = {node.id: NodeResult(node.id, node.type, layer_of[node.id]) for node in spec.nodes}
        incoming = spec.upstream()
        cancelled = threading.Event()
        batches = layers if mode == "optimized" else [[node_id] for node_id in spec.topological_order()]
        pool = ThreadPoolExecutor(max_workers=spec.max_parallel, thread_name_prefix=f"wf-{spec.id[:20]}")
        # Node threads see the caller's context variables (the run id its log lines carry).
        submit = submit or (lambda node, work: pool.submit(contextvars.copy_context().run, work))
        finished = threading.Event()
        watcher = threading.Thread(target=_watch, args=(should_stop, cancelled, finished), daemon=True,
                                   name=f"wf-{spec.id[:20]}-stop")
        watcher.start()
        try:
            for batch in batches:
                if cancelled.is_set():
                    break
                futures = []
                for node_id in batch:
                    node = spec.node(node_id)
                    if node_id in reuse:
                        results[node_id].output, results[node_id].reused = reuse[node_id], True
                        self._end(results[node_id], COMPLETED, observe)
                        continue
                    fate, upstream = self._fate(node_id, incoming[node_id], results)
                    if fate is not None:
                        self._end(results[node_id], fate, observe, error=upstream)
                        continue
                    node_input = self._input(node_id, incoming[node_id], upstream, inputs)
                    context = {"inputs": inputs, "input": node_input, "workflow": {"id": spec.id},
                               "nodes": {nid: {"output": r.output, "status": r.status} for nid, r in results.items()
                                         if r.status in NODE_ENDED}}
                    futures.append(submit(node, self._work(node, results[node_id], context, node_input, upstream,
                                                           inputs, observe, cancelled)))
                for future in futures:
                    future.result()
        finally:
            finished.set()
            pool.shutdown(wait=True)
        for result in results.values():
            if result.status == PENDING:
                self._end(result, CANCELLED, observe, error={"code": "cancelled", "message": "the run was cancelled"})
        outputs = self._outputs(spec, results, observe)
        statuses = {r.status for r in results.values()}
        stopped = cancelled.is_set() or should_stop() or CANCELLED in statuses
        status = CANCELLED if stopped else FAILED if FAILED in statuses else COMPLETED
        return WorkflowResult(spec.id, mode, status, layers, results, round(time.monotonic() - started, 4), outputs)

    def _outputs(self, spec: WorkflowSpec, results: dict[str, NodeResult], observe: NodeObserver) -> dict[str, Any]:
        """The completed output nodes' values, together at most FLOWGATE_MAX_OUTPUT_BYTES as JSON (the run's
        result): an output node that would go past it fails instead."""
        limit, total, outputs = self.toolbox.max_output_bytes, 2, {}
        for node in spec.nodes:
            result = results[node.id]
            if node.type != "output" or result.status != COMPLETED:
                continue
            size = len(json.dumps(result.output)) + len(json.dumps(node.id)) + 2
            if total + size > limit:
                result.output = None
                self._end(result, FAILED, observe, error={
                    "code": "result_too_large", "message": f"node '{node.id}': the workflow's outputs would be "
                    f"more than {limit} bytes as JSON (FLOWGATE_MAX_OUTPUT_BYTES)"})
                continue
            outputs[node.id], total = result.output, total + size
        return outputs

    @staticmethod
    def _fate(node_id: str, edges: list[Any], results: dict[str, NodeResult]) -> tuple[str | None, Any]:
        """(None, live parents' outputs) when the node should run; (status, error) when it should not."""
        if not edges:
            return None, {}
        live: dict[str, Any] = {}
        for edge in edges:
            parent = results[edge.source]
            if parent.status in (FAILED, UPSTREAM_FAILED):
                return UPSTREAM_FAILED, {"code": "upstream_failed", "message": f"upstream node '{edge.source}' failed"}
            if parent.status == CANCELLED:
                return CANCELLED, {"code": "cancelled", "message": f"upstream node '{edge.source}' was cancelled"}
            if parent.status != COMPLETED:
                continue
            if edge.branch is not None and parent.type == "condition" and parent.output.get("branch") != edge.branch:
                continue
            live[edge.source] = parent.output
        if not live:
            return SKIPPED, {"code": "branch_not_taken", "message": "no incoming connection was taken"}
        return None, live

    @staticmethod
    def _input(node_id: str, edges: list[Any], upstream: dict[str, Any], inputs: dict[str, Any]) -> Any:
        if not edges:
            return inputs
        return next(iter(upstream.values())) if len(upstream) == 1 else dict(upstream)

    def _work(self, node: NodeSpec, result: NodeResult, context: dict[str, Any], node_input: Any,
              upstream: dict[str, Any], inputs: dict[str, Any], observe: NodeObserver,
              cancelled: threading.Event) -> Callable[[], NodeResult]:
        def work() -> NodeResult:
            attributes = {"flowgate.node_id": node.id, "flowgate.node_type": node.type}
            with tracing.tracer().start_as_current_span(f"node {node.id}", attributes=attributes) as span:
                try:
                    self.execute(node, context, node_input, upstream, inputs, result, observe, cancelled)
                except Exception as exc:  # the engine must record every node, whatever a node type does
                    log.exception("node %s failed unexpectedly", node.id)
                    self._end(result, FAILED, observe, error={"code": "internal_error",
                                                              "message": f"{type(exc).__name__}: {exc}"})
                span.set_attributes({"flowgate.status": result.status, "flowgate.attempts": result.attempts})
                if result.status == FAILED:
                    span.set_status(StatusCode.ERROR, (result.error or {}).get("message", "failed"))
            return result

        return work

    # --- one node ---------------------------------------------------------------------------------

    def execute(self, node: NodeSpec, context: dict[str, Any], node_input: Any, upstream: dict[str, Any],
                inputs: dict[str, Any], result: NodeResult, observe: NodeObserver = lambda r: None,
                cancelled: threading.Event | None = None) -> NodeResult:
        """Resolve the node's templates, check its config, then run it (cached, retried, timed out)."""
        cancelled = cancelled or threading.Event()
        result.status, result.started_at = RUNNING, _now()
        observe(result)
        node_type = NODE_TYPES.get(node.type)
        if node_type is None:
            return self._end(result, FAILED, observe, error={
                "code": "unknown_node_type", "message": f"node '{node.id}': unknown type '{node.type}'"})
        ok, value = _resolve(node, node_type.config, context, self.toolbox.max_output_bytes, cancelled)
        if not ok:
            if cancelled.is_set():
                return self._end(result, CANCELLED, observe, error={"code": "cancelled",
                                                                    "message": "the run was cancelled"})
            return self._end(result, FAILED, observe, error=value)
        resolved, config = value
        store, ttl = (self.cache, node.cache.ttl_seconds) if node.cache and self.cache else (None, 0.0)
        key = cache_key(node.type, resolved, node_input) if store else None
        if store and key:
            hit, value = store.get(key)
            if hit:
                result.cached, result.output = True, value
                return self._end(result, COMPLETED, observe)
        error: dict[str, Any] | None = None
        for attempt in range(node.retries + 1):
            if attempt:
                if cancelled.wait(node.retry_backoff_seconds * 2 ** (attempt - 1)):
                    break
            result.attempts = attempt + 1
            ctx = NodeContext(node.id, node_input, inputs, upstream, self.toolbox,
                              deadline=time.monotonic() + node.timeout)
            ok, value = _attempt(node_type.run, config, ctx, node.timeout, cancelled)
            if ok:
                result.output = value
                if store and key:
                    store.put(key, node.type, value, ttl)
                return self._end(result, COMPLETED, observe)
            error = value
            if error.pop("terminal", False) or cancelled.is_set():
                break
            log.info("node %s attempt %d failed: %s", node.id, attempt + 1, error["message"])
        if cancelled.is_set():
            return self._end(result, CANCELLED, observe,
                             error={"code": "cancelled", "message": "the run was cancelled"})
        assert error is not None  # the first attempt always runs (retries >= 0): it returned or set `error`
        if error.get("code") == "cancelled":  # stopped from outside before the run's stop reached the engine
            return self._end(result, CANCELLED, observe, error=error)
        return self._end(result, FAILED, observe, error=error)

    def run_node(self, node: NodeSpec, input_data: dict[str, Any]) -> NodeResult:
        """One node by itself (execute-node): `input_data` is its input and its `inputs`; no cache, no retries."""
        single = node.model_copy(update={"retries": 0, "cache": None})
        context = {"inputs": input_data, "input": input_data, "nodes": {}, "workflow": {"id": None}}
        return self.execute(single, context, input_data, {}, input_data, NodeResult(node.id, node.type, 0))

    @staticmethod
    def _end(result: NodeResult, status: str, observe: NodeObserver, error: dict[str, Any] | None = None) -> NodeResult:
        result.status, result.error = status, scrub(error)  # errors quote configs, which may hold resolved secrets
        result.finished_at = _now()
        if result.started_at:
            result.duration_seconds = round((result.finished_at - result.started_at).total_seconds(), 4)
        observe(result)
        return result


def _watch(should_stop: Callable[[], bool], cancelled: threading.Event, finished: threading.Event) -> None:
    """Turn the caller's stop check into the run's `cancelled` event, so running nodes hear of it."""
    while not finished.wait(0.1):
        if should_stop():
            cancelled.set()
            return


def _in_thread(work: Callable[[], Any], name: str, timeout: float, cancelled: threading.Event,
               stop: threading.Event) -> list[Any]:
    """[work()], or [] when `timeout` passes or the run is cancelled first: then `stop` is set and the thread
    abandoned (Python cannot kill a thread, so work checks `stop` and bounds its I/O and its calls)."""
    done: list[Any] = []
    thread = threading.Thread(target=contextvars.copy_context().run, args=(lambda: done.append(work()),),
                              name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline and not cancelled.is_set():
        thread.join(min(0.05, max(deadline - time.monotonic(), 0)))
    if cancelled.is_set() and thread.is_alive():
        stop.set()
        thread.join(1.0)
    if thread.is_alive():
        stop.set()
    return done


def _resolve(node: NodeSpec, config_type: Any, context: dict[str, Any], max_chars: int,
             cancelled: threading.Event) -> tuple[bool, Any]:
    """(True, (resolved config, validated config)) or (False, error dict): the node's templates, rendered within
    its timeout (a render past it is abandoned as the attempt of a node is) and capped like outputs."""
    stop = threading.Event()
    budget = RenderBudget(max_chars=max_chars, deadline=time.monotonic() + node.timeout, timeout=node.timeout,
                          cancelled=stop)

    def work() -> tuple[bool, Any]:
        try:
            resolved = render(node.config, context, budget=budget)
            return True, (resolved, config_type.model_validate(resolved))
        except TemplateFailed as exc:
            return False, {"code": "template_error", "message": f"node '{node.id}': {exc}", "field": exc.field,
                           "expression": exc.expression}
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "config." + ".".join(str(p) for p in first["loc"])
            return False, {"code": "invalid_config", "message": f"node '{node.id}': {where}: {first['msg']}",
                           "field": where}

    done = _in_thread(work, f"render-{node.id[:20]}", node.timeout, cancelled, stop)
    if done:
        return done[0]
    return False, {"code": "template_error", "field": "config", "message": f"node '{node.id}': template error "
                   f"in config: limit: rendering took longer than the node's timeout ({node.timeout:g} s)"}


def _attempt(run: Callable[[Any, NodeContext], Any], config: Any, ctx: NodeContext, timeout: float,
             cancelled: threading.Event) -> tuple[bool, Any]:
    """(True, output) or (False, error dict); a node past its timeout, or of a cancelled run, is told to stop
    (ctx.cancelled) and abandoned: node types check ctx and bound their I/O."""

    def work() -> tuple[bool, Any]:
        try:
            return True, _json_ready(run(config, ctx), ctx.toolbox.max_output_bytes)
        except NodeFailed as exc:
            return False, {"code": exc.code, "message": f"node '{ctx.node_id}': {exc.message}",
                           "terminal": exc.terminal, "failure_class": exc.failure_class}
        except Exception as exc:  # a node type's own bug or a library error: recorded, retried
            return False, {"code": "node_error", "message": f"node '{ctx.node_id}': {type(exc).__name__}: {exc}",
                           "failure_class": classify(exc).failure_class}

    done = _in_thread(work, f"node-{ctx.node_id[:20]}", timeout, cancelled, ctx.cancelled)
    if done:
        return done[0]
    if cancelled.is_set():
        return False, {"code": "cancelled", "message": f"node '{ctx.node_id}': the run was cancelled"}
    return False, {"code": "timeout", "message": f"node '{ctx.node_id}': timed out after {timeout:g} s",
                   "failure_class": TRANSIENT}


def _json_ready(value: Any, limit: int) -> Any:
    """Outputs are stored and cached as JSON: make sure they are (dates become ISO strings) and that they fit
    FLOWGATE_MAX_OUTPUT_BYTES."""
    text = json.dumps(value, default=lambda o: o.isoformat() if hasattr(o, "isoformat") else str(o))
    if len(text) > limit:
        raise NodeFailed(f"output is {len(text)} bytes as JSON; the limit is {limit} (FLOWGATE_MAX_OUTPUT_BYTES)",
                         code="output_too_large", terminal=True)
    output = json.loads(text)
    try:  # what the run stores must be what its pages can show (the run's result holds outputs 2 levels down)
        check_depth(output, MAX_OUTPUT_DEPTH)
    except NestedTooDeep as exc:
        raise NodeFailed(f"output is {exc}", code="output_too_deep", terminal=True) from None
    return output
