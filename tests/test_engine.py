"""The workflow engine on its own: layers, cycles, branches, joins, retries, timeouts, cache, templates."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from flows.engine import WorkflowEngine
from flows.nodes import NODE_TYPES, NodeConfig, NodeContext, NodeFailed, Toolbox, node_type
from flows.workflow_spec import NodeSpec, WorkflowSpec


def spec(nodes: list[dict], connections: list[tuple] = (), **extra: Any) -> WorkflowSpec:
    edges = [{"from": c[0], "to": c[1], **({"branch": c[2]} if len(c) > 2 else {})} for c in connections]
    return WorkflowSpec.model_validate({"id": "wf", "nodes": nodes, "connections": edges, **extra})


class MemoryCache:
    """The NodeCache protocol in a dict (the run store's cache is tested in test_workflow_store)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> tuple[bool, Any]:
        return (key in self.data), self.data.get(key)

    def put(self, key: str, node_type: str, output: Any, ttl_seconds: float) -> None:
        self.data[key] = output


class FlakyConfig(NodeConfig):
    fail_times: int = 0
    key: str = "default"


class HoldConfig(NodeConfig):
    parties: int = 1  # > 1: each node waits until that many hold nodes are running at once


class NodeProbes:
    """Test node types, registered for one test: `flaky` fails `fail_times` times per key, then answers with how
    many calls it took; `hold` waits until it is told to stop (60 s at most), records whether it was and stops
    as a well-behaved node does; with `parties`, it instead meets that many other hold nodes, so it completes
    only when they all run at once."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.started = threading.Event()
        self.told_to_stop: list[bool] = []
        self.ended = threading.Event()
        self.barriers: dict[int, threading.Barrier] = {}
        self.lock = threading.Lock()

    def flaky(self, config: FlakyConfig, ctx: NodeContext) -> Any:
        self.calls[config.key] = self.calls.get(config.key, 0) + 1
        if self.calls[config.key] <= config.fail_times:
            raise NodeFailed("not yet")
        return {"calls": self.calls[config.key], "input": ctx.input}

    def hold(self, config: HoldConfig, ctx: NodeContext) -> Any:
        if config.parties > 1:
            with self.lock:
                barrier = self.barriers.setdefault(config.parties, threading.Barrier(config.parties))
            barrier.wait(timeout=60)  # raises (the node fails) unless all parties ran at once
            return ctx.input
        self.started.set()
        told = ctx.cancelled.wait(60)
        self.told_to_stop.append(told)
        self.ended.set()
        if told:
            raise NodeFailed("held until told to stop", code="cancelled")
        return ctx.input


@pytest.fixture(autouse=True)
def nodes() -> Iterator[NodeProbes]:
    """The test node types, removed from the global registry afterwards whatever the test did."""
    nodes = NodeProbes()
    node_type("flaky", FlakyConfig)(nodes.flaky)
    node_type("hold", HoldConfig)(nodes.hold)
    yield nodes
    NODE_TYPES.pop("flaky", None)
    NODE_TYPES.pop("hold", None)


@pytest.fixture
def engine() -> WorkflowEngine:
    return WorkflowEngine(Toolbox(), cache=MemoryCache())


DIAMOND = [{"id": "start", "type": "trigger"}, {"id": "a", "type": "delay", "config": {"seconds": 0.3}},
           {"id": "b", "type": "delay", "config": {"seconds": 0.3}}, {"id": "c", "type": "delay", "config": {"seconds": 0.3}},
           {"id": "join", "type": "join"}, {"id": "out", "type": "output"}]
DIAMOND_EDGES = [("start", "a"), ("start", "b"), ("start", "c"), ("a", "join"), ("b", "join"), ("c", "join"),
                 ("join", "out")]


def test_nodes_are_grouped_into_layers_by_their_deepest_parent():
    workflow = spec(DIAMOND + [{"id": "late", "type": "output"}], DIAMOND_EDGES + [("start", "late"), ("join", "late")])
    assert workflow.layers() == [["start"], ["a", "b", "c"], ["join"], ["out", "late"]]


def test_optimized_runs_a_layer_in_parallel_and_legacy_one_node_at_a_time(engine):
    workflow = spec(DIAMOND, DIAMOND_EDGES)
    optimized = engine.run(workflow, {"x": 1}, "optimized")
    legacy = engine.run(workflow, {"x": 1}, "legacy")
    assert optimized.status == legacy.status == "completed"
    assert optimized.outputs == legacy.outputs == {"out": {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 1}}}
    legacy_nodes = sorted((legacy.nodes[n] for n in "abc"), key=lambda n: n.started_at)
    for earlier, later in zip(legacy_nodes, legacy_nodes[1:]):
        assert later.started_at >= earlier.finished_at  # legacy: each began after the one before ended


def test_optimized_runs_a_layers_nodes_at_once(engine):
    """Three nodes that each wait for the other two to be running: they complete only if the layer is parallel."""
    meet = [{"id": n, "type": "hold", "config": {"parties": 3}} for n in "abc"]
    result = engine.run(spec([{"id": "start", "type": "trigger"}, *meet], [("start", n) for n in "abc"]), {})
    assert {n: result.nodes[n].status for n in "abc"} == {"a": "completed", "b": "completed", "c": "completed"}
    assert max(result.nodes[n].started_at for n in "abc") < min(result.nodes[n].finished_at for n in "abc")


@pytest.mark.parametrize("connections, message", [
    ([("a", "b"), ("b", "c"), ("c", "a")], "cycle: a -> b -> c -> a"),
    ([("a", "ghost")], "dangling connection: no node 'ghost'"),
    ([("a", "a")], "node 'a' connects to itself"),
])
def test_a_bad_graph_is_refused_naming_the_problem(connections, message):
    nodes = [{"id": n, "type": "transform"} for n in "abc"]
    with pytest.raises(ValidationError, match=message):
        spec(nodes, connections)


def test_duplicate_node_ids_are_refused():
    with pytest.raises(ValidationError, match=r"nodes\[1\].id: duplicate node id 'a'"):
        spec([{"id": "a", "type": "trigger"}, {"id": "a", "type": "output"}])


def test_the_branch_not_taken_is_skipped_and_the_join_gets_the_branch_taken(engine):
    workflow = spec(
        [{"id": "start", "type": "trigger"}, {"id": "check", "type": "condition", "config": {"value": "{{ inputs.n > 5 }}"}},
         {"id": "big", "type": "transform", "config": {"value": "big {{ inputs.n }}"}},
         {"id": "small", "type": "transform", "config": {"value": "small {{ inputs.n }}"}},
         {"id": "after_small", "type": "output"},
         {"id": "join", "type": "join"}, {"id": "out", "type": "output"}],
        [("start", "check"), ("check", "big", "true"), ("check", "small", False), ("small", "after_small"),
         ("big", "join"), ("small", "join"), ("join", "out")])
    result = engine.run(workflow, {"n": 9})
    assert result.status == "completed"
    assert {n: result.nodes[n].status for n in ("big", "small", "after_small", "join")} == {
        "big": "completed", "small": "skipped", "after_small": "skipped", "join": "completed"}
    assert result.nodes["small"].error["code"] == "branch_not_taken"
    assert result.outputs == {"out": {"big": "big 9"}}


def test_a_failed_node_fails_its_dependents_and_the_workflow_but_not_independent_branches(engine):
    workflow = spec([{"id": "start", "type": "trigger"}, {"id": "bad", "type": "flaky", "config": {"fail_times": 9, "key": "f1"}},
                     {"id": "after", "type": "output"}, {"id": "other", "type": "output"}],
                    [("start", "bad"), ("bad", "after"), ("start", "other")])
    result = engine.run(workflow, {})
    assert result.status == "failed" and result.failed_nodes == ["bad"]
    assert result.nodes["after"].status == "upstream_failed"
    assert result.nodes["other"].status == "completed"


def test_retries_with_backoff_until_the_node_succeeds(engine):
    node = {"id": "f", "type": "flaky", "config": {"fail_times": 2, "key": "f2"}, "retries": 3,
            "retry_backoff_seconds": 0.05}
    result = engine.run(spec([node]), {})
    assert result.nodes["f"].status == "completed" and result.nodes["f"].attempts == 3
    assert result.nodes["f"].output["calls"] == 3


def test_retries_run_out_and_the_last_error_is_kept(engine):
    node = {"id": "f", "type": "flaky", "config": {"fail_times": 5, "key": "f3"}, "retries": 1,
            "retry_backoff_seconds": 0}
    result = engine.run(spec([node]), {})
    assert result.nodes["f"].status == "failed" and result.nodes["f"].attempts == 2
    assert result.nodes["f"].error == {"code": "node_failed", "message": "node 'f': not yet",
                                       "failure_class": "transient"}


def test_a_node_past_its_timeout_fails_and_is_told_to_stop(engine, nodes):
    """The node would hold for 60 s; the workflow ends at its 0.2 s timeout and the node hears it must stop."""
    result = engine.run(spec([{"id": "slow", "type": "hold", "timeout": 0.2}]), {})
    assert result.nodes["slow"].status == "failed" and result.nodes["slow"].error["code"] == "timeout"
    assert nodes.ended.wait(60) and nodes.told_to_stop == [True]


def test_a_cached_node_answers_from_the_cache_for_the_same_config_and_input(engine):
    node = {"id": "f", "type": "flaky", "config": {"key": "{{ inputs.k }}"}, "cache": 60}
    first = engine.run(spec([node]), {"k": "c1"})
    second = engine.run(spec([node]), {"k": "c1"})
    other = engine.run(spec([node]), {"k": "c2"})
    assert first.nodes["f"].cached is False and second.nodes["f"].cached is True
    assert second.nodes["f"].output == first.nodes["f"].output == {"calls": 1, "input": {"k": "c1"}}
    assert other.nodes["f"].cached is False  # another resolved config: another key


def test_templates_reach_inputs_earlier_outputs_and_filters(engine):
    workflow = spec([
        {"id": "start", "type": "trigger"},
        {"id": "fetch", "type": "transform", "config": {"value": {"body": {"id": 42, "tags": ["a", "b"]}}}},
        {"id": "use", "type": "transform", "config": {"value": {
            "id": "{{ nodes.fetch.output.body.id }}", "text": "{{ inputs.text | upper }}",
            "missing": "{{ inputs.nope | default('fallback') }}", "tags": "{{ nodes.fetch.output.body.tags }}",
            "sentence": "id={{ nodes.fetch.output.body.id }} of {{ inputs.text }}"}}}],
        [("start", "fetch"), ("fetch", "use")])
    result = engine.run(workflow, {"text": "hello"})
    assert result.nodes["use"].output == {"id": 42, "text": "HELLO", "missing": "fallback", "tags": ["a", "b"],
                                          "sentence": "id=42 of hello"}


def test_a_template_error_fails_the_node_naming_node_field_and_expression(engine):
    workflow = spec([{"id": "start", "type": "trigger"},
                     {"id": "use", "type": "transform", "config": {"value": "{{ nodes.start.output.nope.deeper }}"}}],
                    [("start", "use")])
    error = engine.run(workflow, {}).nodes["use"].error
    assert error["code"] == "template_error" and error["field"] == "config.value"
    assert error["message"].startswith("node 'use': template error in config.value: "
                                       "'{{ nodes.start.output.nope.deeper }}'")
    assert "nope" in error["message"]


def test_templates_are_sandboxed(engine):
    node = {"id": "evil", "type": "transform", "config": {"value": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}}
    error = engine.run(spec([node]), {}).nodes["evil"].error
    assert error["code"] == "template_error" and "unsafe" in error["message"]


def test_join_modes_and_the_jsonpath_transform(engine):
    workflow = spec([{"id": "start", "type": "trigger"},
                     {"id": "a", "type": "transform", "config": {"value": {"x": 1}}},
                     {"id": "b", "type": "transform", "config": {"value": {"y": 2}}},
                     {"id": "merged", "type": "join", "config": {"mode": "merge"}},
                     {"id": "listed", "type": "join", "config": {"mode": "list"}},
                     {"id": "pick", "type": "transform", "config": {"jsonpath": {"xs": "$.a.x"},
                                                                    "source": "{{ nodes.listed.output }}"}}],
                    [("start", "a"), ("start", "b"), ("a", "merged"), ("b", "merged"), ("a", "listed"),
                     ("b", "listed"), ("listed", "pick")])
    result = engine.run(workflow, {})
    assert result.nodes["merged"].output == {"x": 1, "y": 2}
    assert result.nodes["listed"].output == [{"x": 1}, {"y": 2}]
    assert result.nodes["pick"].output == {"xs": None}  # a list has no key `a`
    node = NodeSpec(id="p", type="transform", config={"jsonpath": {"first": "$.items[0].id", "all": "$.items[*].id"}})
    assert engine.run_node(node, {"items": [{"id": 1}, {"id": 2}]}).output == {"first": 1, "all": [1, 2]}


def test_invalid_config_fails_the_node_naming_the_field(engine):
    result = engine.run_node(NodeSpec(id="d", type="delay", config={"seconds": "soon"}), {})
    assert result.status == "failed" and result.error["field"] == "config.seconds"


def test_stopping_a_workflow_cancels_running_and_pending_nodes(engine, nodes):
    """Stop is asked once the first node runs; that node would hold for 60 s unless told to stop."""
    workflow = spec([{"id": "wait", "type": "hold"}, {"id": "after", "type": "output"}], [("wait", "after")])
    result = engine.run(workflow, {}, should_stop=nodes.started.is_set)
    assert result.status == "cancelled"
    assert result.nodes["wait"].status == "cancelled" and result.nodes["after"].status == "cancelled"
    assert nodes.ended.wait(60) and nodes.told_to_stop == [True]


def test_registering_a_node_type_is_a_function_and_one_line():
    class Shout(NodeConfig):
        suffix: str = "!"

    @node_type("shout", Shout)
    def shout(config: Shout, ctx: NodeContext) -> str:
        return str(ctx.input["text"]).upper() + config.suffix

    try:
        result = WorkflowEngine(Toolbox()).run_node(NodeSpec(id="s", type="shout"), {"text": "hi"})
        assert result.output == "HI!"
    finally:
        NODE_TYPES.pop("shout")
