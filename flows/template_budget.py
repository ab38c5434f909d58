"""A template render's budget: the largest value it may build, until when it may run, and the sizes it is checked
against (a value's text, a block's output) while it runs; flows.template_limits sizes each call from its arguments."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2.sandbox import SecurityError
from jinja2.utils import Namespace

DEFAULT_MAX_CHARS = 1_048_576
MAX_INT_BITS = 100_000  # ~30,000 digits: far past any real number, far short of a CPU-bound power


class TemplateLimit(SecurityError):
    """A template went past its budget (size, time or a cancel); the message names the limit."""


@dataclass(frozen=True)
class RenderBudget:
    """How much a render may do: the largest value it may build, and until when it may run."""

    max_chars: int = DEFAULT_MAX_CHARS
    deadline: float | None = None  # time.monotonic() value; the node's timeout
    timeout: float | None = None  # for the message
    cancelled: threading.Event | None = None

    def check_time(self) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise TemplateLimit("the run was cancelled while the template rendered")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than the node's timeout ({self.timeout:g} s)")

    def check_size(self, size: int, what: str = "the value") -> None:
        if size > self.max_chars:
            raise TemplateLimit(f"{what} would be {size} characters; the limit is {self.max_chars} "
                                "(FLOWGATE_MAX_OUTPUT_BYTES)")


@dataclass
class _Buffered:
    """Characters held in block buffers not yet joined, in one render."""

    chars: int = 0


_budget: ContextVar[RenderBudget] = ContextVar("flowgate_render_budget", default=RenderBudget())  # noqa: B039 (frozen)
# None outside budget_scope: a render there counts in its own context's, never in one shared by every thread.
_buffered: ContextVar[_Buffered | None] = ContextVar("flowgate_render_buffered", default=None)


def _held() -> _Buffered:
    held = _buffered.get()
    if held is None:
        held = _Buffered()
        _buffered.set(held)
    return held


@contextmanager
def budget_scope(budget: RenderBudget) -> Iterator[None]:
    """Within the block, every check reads `budget`, and block buffers count from zero."""
    tokens = _budget.set(budget), _buffered.set(_Buffered())
    try:
        yield
    finally:
        _budget.reset(tokens[0])
        _buffered.reset(tokens[1])


def current() -> RenderBudget:
    return _budget.get()


def size(value: Any) -> int:
    """The length of a value that has one (a built string or container); 0 for the rest."""
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def text_size(value: Any, limit: int | None = None) -> int:
    """A lower bound of len(str(value)) and of its JSON (but for a bare string's quotes), counted until past `limit`:
    a list holding one large string a million times is small in memory and huge as text."""
    limit = current().max_chars if limit is None else limit
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 4
        elif isinstance(item, int):
            total += max(int(item.bit_length() * 0.30102), 1)
        elif isinstance(item, float):
            total += 3
        elif isinstance(item, Mapping):
            total += 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, Namespace):
            stack.append(item._Namespace__attrs)  # its repr shows them
    return total


def check_text(value: Any, what: str) -> None:
    """Refuse to turn a container into text past the budget (a string is already built, a number is at most
    30,000 digits: nothing to check)."""
    if not isinstance(value, (str, int, float)) and value is not None:
        current().check_size(text_size(value), what)


def check_sizes(values: Iterable[Any]) -> None:
    """Integer arguments that are sizes (a width, a count of pieces) past the budget are refused."""
    budget = current()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > budget.max_chars:
            budget.check_size(value, "an argument")


class OutputBuffer(list):
    """A block's output as jinja collects it (a macro, `{% set %}`, `{% filter %}`, `{% call %}`), counted as it
    grows: a loop inside a block appends references to one string at loop speed, and only the join would show it.
    Every piece counts at least one character; all the buffers of a render together hold at most `max_chars`."""

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0

    def append(self, piece: Any) -> None:
        self._count((piece,))
        super().append(piece)

    def extend(self, pieces: Iterable[Any]) -> None:
        pieces = tuple(pieces)
        self._count(pieces)
        super().extend(pieces)

    def _count(self, pieces: tuple[Any, ...]) -> None:
        added = sum(max(size(piece), 1) for piece in pieces)
        self.chars += added
        held = _held()
        held.chars += added
        current().check_size(held.chars, "the output held in blocks")

    def release(self) -> None:
        _held().chars -= self.chars
        self.chars = 0


def join_output(pieces: Iterable[Any]) -> str:
    """jinja's `concat`: a block's buffer joined, and its count released."""
    if isinstance(pieces, OutputBuffer):
        pieces.release()
    return "".join(pieces)


def check_operands(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """`a ~ b ~ c`: the text of every operand, added up, before any is turned into text."""
    budget = current()
    budget.check_size(sum(len(v) if isinstance(v, str) else text_size(v, budget.max_chars) for v in values),
                      "a concatenated value")
    return values
