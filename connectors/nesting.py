"""How deep a JSON-like document may nest: the recursive walkers (secrets.scrub and redact, templates.has_template)
stop at MAX_DEPTH with NestedTooDeep rather than at Python's recursion limit, where a RecursionError broke every
page that showed the document (security review M1: a 500-level `inputs` made the run list a 500 for everyone).

What callers send is held to a lower bound at the edge (app/api/inputs.py), so a document that passed it is
walked whole; MAX_DEPTH is for what the gateway stores from elsewhere (node outputs) and rows stored before.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Two frames per level in the walkers (the function and its comprehension), under Python's 1,000 with a request's
# own frames (gunicorn, Flask, the view: about 100) on top.
MAX_DEPTH = 100
# A workflow node's output (an http node's response, a transform's value) is stored inside the run's result and
# node states, a few levels down: held well under MAX_DEPTH.
MAX_OUTPUT_DEPTH = 64


class NestedTooDeep(ValueError):
    """A document nests deeper than a walker follows; `path` is where (its keys and indexes, outermost first)."""

    def __init__(self, limit: int, path: tuple[Any, ...] = ()):
        where = ".".join(str(p) for p in path[:8]) + (".…" if len(path) > 8 else "")
        super().__init__(f"nested more than {limit} levels deep" + (f" (at {where})" if where else ""))
        self.limit = limit
        self.path = path


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """NestedTooDeep when `value` holds objects or arrays more than `limit` levels deep (`{}` is one level);
    iterative, so it answers for any depth."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        children: Iterable[tuple[Any, Any]]
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, (list, tuple)):
            children = enumerate(item)
        else:
            continue
        if depth > limit:
            raise NestedTooDeep(limit, path)
        stack.extend((child, depth + 1, (*path, key)) for key, child in children)
