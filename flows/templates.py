"""Node config templates: Jinja2 in a sandbox over `inputs`, `input` and earlier nodes' outputs, with bounded work.

A template may not build a value larger than its budget's `max_chars` (repetition, concatenation, `%`, str.format,
a method or filter's result, a block's output, the rendered text), sized before it is built
(flows.template_limits); it may not run past its node's deadline or a cancel (checked on every loop iteration,
call and output chunk), and `range` stays capped by the sandbox (100,000 items).
"""
from __future__ import annotations

import functools
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.ext import Extension
from jinja2.lexer import Token, TokenStream
from jinja2.nodes import Concat
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from connectors.nesting import MAX_DEPTH, NestedTooDeep
from flows import template_budget as budgets
from flows import template_limits as limits
from flows.template_budget import DEFAULT_MAX_CHARS, MAX_INT_BITS, RenderBudget, TemplateLimit

__all__ = ["DEFAULT_MAX_CHARS", "RenderBudget", "TemplateFailed", "TemplateLimit", "has_template", "render"]

# A value that is one expression and nothing else keeps its type ("{{ nodes.a.output }}" stays a dict).
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)
_LOOP_GUARD = "_flowgate_loop_guard"


class TemplateFailed(ValueError):
    """A template in a node's config failed; names the field, the expression and why."""

    def __init__(self, field: str, expression: str, reason: str):
        super().__init__(f"template error in {field}: {expression!r}: {reason}")
        self.field = field
        self.expression = expression
        self.reason = reason


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
    budget = budgets.current()
    budget.check_time()
    for item in iterable:
        budget.check_time()
        yield item


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment markers
    def bounded(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = limits.check_filter(name, function, args, kwargs)
        result = function(*args, **kwargs)
        budgets.current().check_size(budgets.size(result), f"the result of the '{name}' filter")
        return result

    return bounded


class _BoundedCodeGenerator(CodeGenerator):
    """jinja's compiler with two changes: block buffers are OutputBuffers (counted as they grow), and the operands
    of `~` are sized before they are turned into text."""

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    @optimizeconst
    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            self.write("(markup_join if context.eval_ctx.volatile else str_join)")
        else:
            self.write("markup_join" if frame.eval_ctx.autoescape else "str_join")
        self.write("(environment.check_operands((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write(")))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with every value it would build sized before it is built and the time spent
    bounded, by the current RenderBudget (flows.template_budget)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator
    output_buffer = staticmethod(budgets.OutputBuffer)
    check_operands = staticmethod(budgets.check_operands)

    def __init__(self) -> None:
        # StrictUndefined: a typo is an error naming the missing attribute, not an empty string; `default` works.
        super().__init__(undefined=StrictUndefined, autoescape=False, extensions=[_LoopGuard], finalize=_finalize)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals[_LOOP_GUARD] = _loop_guard
        self.globals["lipsum"] = limits.lipsum

    def concat(self, pieces: Any) -> str:  # jinja's `"".join`, for block buffers
        return budgets.join_output(pieces)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        budget = budgets.current()
        budget.check_time()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator_ == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit("a product past 30,000 digits")
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(count, int) and budgets.size(sequence):
                each = len(sequence) if isinstance(sequence, (str, bytes)) else budgets.text_size(sequence)
                budget.check_size(each * max(count, 0), "a repeated value")
        elif operator_ == "**":
            if ints and right > 0 and left.bit_length() * right > MAX_INT_BITS:
                raise TemplateLimit("a power past 30,000 digits")
        elif operator_ == "+" and budgets.size(left) and budgets.size(right):
            budget.check_size(len(left) + len(right), "a concatenated value")
        elif operator_ == "%":
            limits.check_percent(left, right)
        result = self.binop_table[operator_](left, right)
        budget.check_size(budgets.size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's form)
        budget = budgets.current()
        budget.check_time()
        args = limits.check_method(__obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_size(budgets.size(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format and format_map (and Markup's), through a formatter that sizes each field first."""
        if not (isinstance(value, (types.MethodType, types.BuiltinMethodType))  # as jinja's own test
                and value.__name__ in ("format", "format_map") and isinstance(value.__self__, str)):
            return None
        text, mapping = value.__self__, value.__name__ == "format_map"
        formatter = (limits.BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup)
                     else limits.BoundedFormatter(self))

        def bounded(*args: Any, **kwargs: Any) -> str:
            if mapping:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return type(text)(formatter.vformat(text, args, kwargs))

        return bounded


def _finalize(value: Any) -> Any:
    """Every `{{ value }}` is turned into text: a container is sized first."""
    budgets.check_text(value, "an output value")
    return value


@functools.cache
def _environment() -> BoundedSandbox:
    return BoundedSandbox()


def has_template(value: Any, _depth: int = 1) -> bool:
    """True when `value` (or anything inside it) contains a template; NestedTooDeep past
    connectors.nesting.MAX_DEPTH levels."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, (dict, list)) and _depth > MAX_DEPTH:
        raise NestedTooDeep(MAX_DEPTH)
    if isinstance(value, dict):
        return any(has_template(v, _depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(has_template(v, _depth + 1) for v in value)
    return False


def render(value: Any, context: dict[str, Any], field: str = "config", budget: RenderBudget | None = None) -> Any:
    """`value` with every template string rendered against `context`; dicts and lists are walked.

    `budget` bounds the work (default: DEFAULT_MAX_CHARS per value, no deadline); past it, TemplateFailed
    names the limit."""
    with budgets.budget_scope(budget or RenderBudget()):
        return _render(value, context, field)


def _render(value: Any, context: dict[str, Any], field: str) -> Any:
    if isinstance(value, dict):
        return {key: _render(item, context, f"{field}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context, f"{field}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str) or not has_template(value):
        return value
    env = _environment()
    budget = budgets.current()
    try:
        whole = _WHOLE_EXPRESSION.match(value)
        if whole:
            result = env.compile_expression(whole["expr"], undefined_to_none=False)(**context)
            if isinstance(result, StrictUndefined):
                str(result)  # raises UndefinedError naming what is missing
            budgets.check_text(result, "the value")  # a list of one string repeated by reference is small until sent
            return result
        size, chunks = 0, []
        for chunk in env.from_string(value).generate(**context):
            size += max(len(chunk), 1)  # an empty chunk is still a reference held
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
