"""Node config templates: Jinja2 in a sandbox over `inputs`, `input` and earlier nodes' outputs, with bounded work.

A template may not build a value larger than its budget's `max_chars` (repetition, concatenation, `%`, a
method or filter's result, the rendered text), may not run past its node's deadline or a cancel (checked on
every loop iteration, call and output chunk), and `range` stays capped by the sandbox (100,000 items).
"""
from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# A value that is one expression and nothing else keeps its type ("{{ nodes.a.output }}" stays a dict).
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)
DEFAULT_MAX_CHARS = 1_048_576
_MAX_INT_BITS = 100_000  # ~30,000 digits: far past any real number, far short of a CPU-bound power
_LOOP_GUARD = "_flowgate_loop_guard"


class TemplateFailed(ValueError):
    """A template in a node's config failed; names the field, the expression and why."""

    def __init__(self, field: str, expression: str, reason: str):
        super().__init__(f"template error in {field}: {expression!r}: {reason}")
        self.field = field
        self.expression = expression
        self.reason = reason


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


_budget: ContextVar[RenderBudget] = ContextVar("flowgate_render_budget", default=RenderBudget())


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_ints(args: Iterable[Any]) -> None:
    """A width or count argument past the budget (`'x'.ljust(10**9)`, `center(10**9)`) is refused before it runs."""
    budget = _budget.get()
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and arg > budget.max_chars:
            budget.check_size(arg, "an argument")


class _LoopGuard(Extension):
    """Rewrites `{% for x in ITER %}` as `{% for x in _flowgate_loop_guard(ITER) %}`, so every iteration checks
    the budget: nested loops stop at the node's deadline however little each iteration does."""

    def filter_stream(self, stream: TokenStream) -> Iterator[Token]:
        state, depth, previous = None, 0, None
        for token in stream:
            if state == "iter":
                if depth == 0 and (token.type == "block_end" or (token.type == "name"
                                                                  and token.value in ("if", "recursive"))):
                    yield Token(token.lineno, "rparen", ")")
                    state = None
                elif token.type in ("lparen", "lbracket", "lbrace"):
                    depth += 1
                elif token.type in ("rparen", "rbracket", "rbrace"):
                    depth -= 1
                yield token
            elif state == "target":
                yield token
                if token.type == "name" and token.value == "in":
                    yield Token(token.lineno, "name", _LOOP_GUARD)
                    yield Token(token.lineno, "lparen", "(")
                    state, depth = "iter", 0
            else:
                yield token
                if token.type == "name" and token.value == "for" and previous == "block_begin":
                    state = "target"
            previous = token.type


def _loop_guard(iterable: Any) -> Iterator[Any]:
    budget = _budget.get()
    budget.check_time()
    for item in iterable:
        budget.check_time()
        yield item


# Filters and str methods whose integer arguments are sizes (a width, a count of pieces): checked before they run.
_SIZED_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "slice", "batch"})
_SIZED_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment markers
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        budget.check_time()
        if name in _SIZED_FILTERS:
            _check_ints([*args[1:], *kwargs.values()])
        result = function(*args, **kwargs)
        budget.check_size(_size(result), f"the result of the '{function.__name__}' filter")
        return result

    return bounded


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with the size of every built value and the time spent bounded by the
    current RenderBudget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        # StrictUndefined: a typo is an error naming the missing attribute, not an empty string; `default` works.
        super().__init__(undefined=StrictUndefined, autoescape=False, extensions=[_LoopGuard])
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals[_LOOP_GUARD] = _loop_guard

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        budget.check_time()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator_ == "*":
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise TemplateLimit("a product past 30,000 digits")
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(count, int) and _size(sequence):
                budget.check_size(len(sequence) * max(count, 0), "a repeated value")
        elif operator_ == "**":
            if ints and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise TemplateLimit("a power past 30,000 digits")
        elif operator_ == "+" and _size(left) and _size(right):
            budget.check_size(len(left) + len(right), "a concatenated value")
        elif operator_ == "%" and isinstance(left, str):
            _check_ints(int(width) for width in re.findall(r"%[-+ #0]*(\d{7,})", left))  # `'%999999999s' % x`
        result = self.binop_table[operator_](left, right)
        budget.check_size(_size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's form)
        budget = _budget.get()
        budget.check_time()
        if getattr(__obj, "__name__", None) in _SIZED_METHODS:  # `'x'.ljust(10**9)`
            _check_ints([*args, *kwargs.values()])
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_size(_size(result))
        return result


@functools.cache
def _environment() -> BoundedSandbox:
    return BoundedSandbox()


def has_template(value: Any) -> bool:
    """True when `value` (or anything inside it) contains a template."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    return False


def render(value: Any, context: dict[str, Any], field: str = "config", budget: RenderBudget | None = None) -> Any:
    """`value` with every template string rendered against `context`; dicts and lists are walked.

    `budget` bounds the work (default: DEFAULT_MAX_CHARS per value, no deadline); past it, TemplateFailed
    names the limit."""
    token = _budget.set(budget or RenderBudget())
    try:
        return _render(value, context, field)
    finally:
        _budget.reset(token)


def _render(value: Any, context: dict[str, Any], field: str) -> Any:
    if isinstance(value, dict):
        return {key: _render(item, context, f"{field}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context, f"{field}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str) or not has_template(value):
        return value
    env = _environment()
    budget = _budget.get()
    try:
        whole = _WHOLE_EXPRESSION.match(value)
        if whole:
            result = env.compile_expression(whole["expr"], undefined_to_none=False)(**context)
            if isinstance(result, StrictUndefined):
                str(result)  # raises UndefinedError naming what is missing
            return result
        size, chunks = 0, []
        for chunk in env.from_string(value).generate(**context):
            size += len(chunk)
            budget.check_size(size, "the rendered text")
            budget.check_time()
            chunks.append(chunk)
        return "".join(chunks)
    except TemplateLimit as exc:
        raise TemplateFailed(field, value, f"limit: {exc}") from None
    except TemplateError as exc:
        raise TemplateFailed(field, value, f"{type(exc).__name__}: {exc.message or exc}") from None
    except RecursionError:
        raise TemplateFailed(field, value, "RecursionError: nested too deeply") from None
    except MemoryError:
        raise TemplateFailed(field, value, "MemoryError: the value is too large") from None
    except Exception as exc:  # a filter or method given the wrong kind of value: the template's error, not ours
        raise TemplateFailed(field, value, f"{type(exc).__name__}: {exc}") from None
