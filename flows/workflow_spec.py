"""Workflow definitions: nodes and connections, validated by pydantic, and the graph checks (ids, cycles, layers)."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from functools import cached_property
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from connectors.failures import RetryPolicy
from connectors.spec import OnConflict, ScheduleSpec

NODE_ID = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$"
MAX_NODES = 500
MAX_CONNECTIONS = 5000
MAX_DEPTH = 100  # layers: a chain longer than this is a loop written out by hand, not a workflow


class GraphError(ValueError):
    """The nodes and connections do not form a valid DAG; `errors` names each problem by field."""

    def __init__(self, errors: list[dict[str, str]]):
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class CacheSpec(_Strict):
    """Reuse a node's output for the same type, resolved config and input, for `ttl_seconds`."""

    ttl_seconds: float = Field(gt=0, le=30 * 86400, description="How long a cached output stays valid.")


class NodeSpec(_Strict):
    """One node: its type, its config (values may be Jinja2 templates), retries, timeout and cache."""

    id: str = Field(pattern=NODE_ID)
    type: str = Field(min_length=1, max_length=50)
    name: str | None = Field(None, max_length=200, description="Label for people; ignored by the engine.")
    config: dict[str, Any] = Field(default_factory=dict)
    retries: int = Field(0, ge=0, le=10, description="Attempts after the first when the node fails.")
    retry_backoff_seconds: float = Field(0.5, ge=0, le=60, description="Wait before the first retry; doubles.")
    timeout: float = Field(60.0, gt=0, le=3600, description="Seconds one attempt may take.")
    cache: CacheSpec | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _ttl_shorthand(cls, value: Any) -> Any:
        # `cache: 300` is short for `cache: {ttl_seconds: 300}`.
        return {"ttl_seconds": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Connection(_Strict):
    """An edge `source -> target`; from a condition node, `branch` says on which outcome it is taken."""

    source: str = Field(validation_alias=AliasChoices("source", "from"), min_length=1)
    target: str = Field(validation_alias=AliasChoices("target", "to"), min_length=1)
    branch: str | None = Field(None, validation_alias=AliasChoices("branch", "sourceHandle"),
                               description="Condition outcome ('true', 'false', or a case value).")

    @field_validator("branch", mode="before")
    @classmethod
    def _branch_text(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value


class WorkflowSpec(_Strict):
    """A DAG of nodes; `max_parallel` bounds how many nodes of one layer run at once."""

    id: str = Field(pattern=NODE_ID)
    description: str = ""
    nodes: list[NodeSpec] = Field(min_length=1, max_length=MAX_NODES)
    connections: list[Connection] = Field(default_factory=list, max_length=MAX_CONNECTIONS,
                                          validation_alias=AliasChoices("connections", "edges"))
    max_parallel: int = Field(16, ge=1, le=64)
    schedule: ScheduleSpec | None = Field(None, description="Run on a schedule, fired by the gateway (a workflow "
                                                            "file's only).")
    callback_url: str | None = Field(None, min_length=1, max_length=2000, description=(
        "Where scheduled runs POST their document when they end (a workflow file's only)."))
    retry: RetryPolicy | None = Field(None, description="Run a failed execution again, by failure class (an "
                                                        "execute's `retry` overrides it); none by default.")
    on_conflict: OnConflict = Field(
        "queue", description="An execute while an execution of this workflow is queued or running: queue behind it, "
                             "join it, skip, reject (409), or keep at most one queued behind the running one (an "
                             "execute's `on_conflict` overrides it).")

    @model_validator(mode="after")
    def _valid_graph(self) -> WorkflowSpec:
        check_graph(self)
        return self

    def node(self, node_id: str) -> NodeSpec:
        """The node with this id."""
        return self._by_id[node_id]

    @cached_property
    def _by_id(self) -> dict[str, NodeSpec]:
        return {node.id: node for node in self.nodes}

    def upstream(self) -> dict[str, list[Connection]]:
        """Incoming connections of every node (empty for roots)."""
        incoming: dict[str, list[Connection]] = {node.id: [] for node in self.nodes}
        for connection in self.connections:
            incoming[connection.target].append(connection)
        return incoming

    def layers(self) -> list[list[str]]:
        """Nodes grouped by depth: a node's layer is one more than its deepest parent's (Kahn's algorithm)."""
        return layers_of(self)

    def declared_inputs(self) -> dict[str, Any]:
        """The inputs a caller may give, in the order they appear: each trigger node's `defaults` with their values,
        then every other name a template reads as `inputs.<name>` or `inputs['<name>']`, without a default."""
        found: dict[str, Any] = {}
        for node in self.nodes:
            if node.type == "trigger" and isinstance(node.config.get("defaults"), dict):
                for name, value in node.config["defaults"].items():
                    found.setdefault(str(name), value)
        for node in self.nodes:
            for text in _strings(node.config):
                for match in _INPUT_REFERENCE.finditer(text):
                    found.setdefault(match.group(1) or match.group(2), None)
        return found

    def topological_order(self) -> list[str]:
        """Every node after all of its parents (the order `legacy` mode runs them in)."""
        return [node_id for layer in self.layers() for node_id in layer]


Mode = Literal["optimized", "legacy"]
# `inputs.name` or `inputs['name']` in a template: a name the workflow reads from its caller.
_INPUT_REFERENCE = re.compile(r"""\binputs\s*(?:\.\s*([A-Za-z_]\w*)|\[\s*['"]([^'"]+)['"]\s*\])""")


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a node's config (keys aside)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def check_graph(spec: WorkflowSpec) -> None:
    """Duplicate ids, connections to unknown nodes, self-loops and cycles, each named; raises GraphError."""
    errors: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, node in enumerate(spec.nodes):
        if node.id in seen:
            errors.append({"field": f"nodes[{index}].id", "message": f"duplicate node id '{node.id}'"})
        seen.add(node.id)
    for index, connection in enumerate(spec.connections):
        for end in ("source", "target"):
            node_id = getattr(connection, end)
            if node_id not in seen:
                errors.append({"field": f"connections[{index}].{end}",
                               "message": f"dangling connection: no node '{node_id}'"})
        if connection.source == connection.target:
            errors.append({"field": f"connections[{index}]",
                           "message": f"node '{connection.source}' connects to itself"})
    if errors:
        raise GraphError(errors)
    cycle = find_cycle(spec)
    if cycle:
        raise GraphError([{"field": "connections", "message": "cycle: " + " -> ".join(cycle)}])
    depth = len(layers_of(spec))
    if depth > MAX_DEPTH:
        raise GraphError([{"field": "connections", "message": f"{depth} layers deep; the limit is {MAX_DEPTH}"}])


def find_cycle(spec: WorkflowSpec) -> list[str] | None:
    """One cycle as a path that returns to its start, or None."""
    children: dict[str, list[str]] = defaultdict(list)
    for connection in spec.connections:
        children[connection.source].append(connection.target)
    white, grey, black = 0, 1, 2
    colour = {node.id: white for node in spec.nodes}
    for root in colour:
        if colour[root] != white:
            continue
        path, stack = [root], [iter(children[root])]
        colour[root] = grey
        while stack:  # iterative DFS: a deep chain must not hit the recursion limit
            child = next(stack[-1], None)
            if child is None:
                colour[path.pop()] = black
                stack.pop()
            elif colour[child] == grey:
                return path[path.index(child):] + [child]
            elif colour[child] == white:
                colour[child] = grey
                path.append(child)
                stack.append(iter(children[child]))
    return None


def layers_of(spec: WorkflowSpec) -> list[list[str]]:
    """Kahn's algorithm by levels; nodes keep their declared order inside a layer."""
    order = {node.id: index for index, node in enumerate(spec.nodes)}
    parents: dict[str, set[str]] = {node_id: set() for node_id in order}
    children: dict[str, set[str]] = defaultdict(set)
    for connection in spec.connections:
        parents[connection.target].add(connection.source)
        children[connection.source].add(connection.target)
    remaining = {node_id: len(p) for node_id, p in parents.items()}
    layer = [node_id for node_id, count in remaining.items() if count == 0]
    result = []
    while layer:
        layer.sort(key=order.__getitem__)
        result.append(layer)
        following = []
        for node_id in layer:
            for child in children[node_id]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    following.append(child)
        layer = following
    return result
