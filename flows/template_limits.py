"""The size of what a template call would build, worked out from its arguments before the call, not after.

A width (`'{:>999999999}'.format(x)`, `'%*s' % (n, x)`), a count (`lipsum(n=...)`, `'\\t'.expandtabs(n)`) or a
reference repeated by a template (`[s] * n`, `join` over one string many times) costs nothing to write and
gigabytes to build: str.format, `%`, lipsum and the str methods and filters whose result grows with an argument are
sized here and refused past the budget's `max_chars` (flows.template_budget) before they allocate anything.
"""
from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Mapping
from typing import Any

from jinja2.constants import LOREM_IPSUM_WORDS
from jinja2.filters import make_attrgetter
from jinja2.sandbox import SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum

from flows.template_budget import check_sizes, check_text, current, size, text_size

_HUGE = 10**18  # the size of a number written with more than 9 digits: past any budget


def _number(digits: str | None) -> int:
    if not digits:
        return 0
    return _HUGE if len(digits) > 9 else int(digits)


def spec_size(spec: str) -> int:
    """An upper bound of the width and precision a format spec asks for (`>999999999`, `.500000f`, `08.3`)."""
    return sum(_number(digits) for digits in re.findall(r"\d+", spec))


# printf-style: %[(key)][flags][width][.precision][length]type
_PERCENT = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?"
                      r"(?P<type>.)", re.DOTALL)


def check_percent(template: Any, values: Any) -> None:
    """`template % values` (the `%` operator, the `format` filter): widths and precisions, `*` ones included, and
    the values' text, added up before the string is built."""
    if not isinstance(template, str):
        return
    budget = current()
    positional = list(values) if isinstance(values, tuple) else [values]
    mapping = values if isinstance(values, Mapping) else None
    index, total = 0, len(template)

    def take() -> Any:
        nonlocal index
        index += 1
        return positional[index - 1] if index <= len(positional) else None

    for spec in _PERCENT.finditer(template):
        width = take() if spec["width"] == "*" else _number(spec["width"])
        precision = take() if spec["precision"] == "*" else _number(spec["precision"])
        if spec["type"] == "%":
            value = None
        elif spec["key"] is not None and mapping is not None:
            value = mapping.get(spec["key"])
        else:
            value = take()
        for number in (width, precision if spec["type"] not in "sra" else 0):  # %.3s cuts, %.3f pads
            if isinstance(number, int) and not isinstance(number, bool):
                total += abs(number)
        total += text_size(value, budget.max_chars)
        budget.check_size(total, "the formatted value")


class _SizedFields(string.Formatter):
    """str.format that adds up each field's width, precision and text before formatting it (mixed in before the
    sandbox's formatters, which are string.Formatters too)."""

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion:  # !r / !s / !a turn the value into text
            check_text(value, "a formatted field")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = current()
        budget.check_time()
        self._total += spec_size(format_spec) + text_size(value, budget.max_chars)
        budget.check_size(self._total, "the formatted value")
        return super().format_field(value, format_spec)


class BoundedFormatter(_SizedFields, SandboxedFormatter):
    """The sandbox's str.format, sized."""


class BoundedEscapeFormatter(_SizedFields, SandboxedEscapeFormatter):
    """The sandbox's Markup.format, sized."""


_LOREM_WORD = max(map(len, LOREM_IPSUM_WORDS.split())) + 2  # a word, a comma or stop, a space


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja's names)
    """jinja's lipsum, its text sized from `n` paragraphs of at most `max` words before it is written (each word
    costs CPU: n=100000 took 4.5 s and 45 MB)."""
    if all(isinstance(v, int) for v in (n, max)):
        current().check_size(n * max * _LOREM_WORD if n > 0 and max > 0 else 0, "lipsum's text")
    return generate_lorem_ipsum(n, html, min, max)


def bounded_items(iterable: Any, separator: int, what: str) -> list[Any]:
    """The items of `iterable` as a list, refused as soon as their text and the separators between them pass the
    budget (what `join` or `sum` would build)."""
    budget = current()
    items, total = [], 0
    for item in iterable:
        budget.check_time()
        total += (len(item) if isinstance(item, str) else text_size(item, budget.max_chars)) + separator
        budget.check_size(total, what)
        items.append(item)
    return items


def _replaced_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    if not (all(isinstance(v, str) for v in (text, old, new))  # Markup is a str
            or all(isinstance(v, bytes) for v in (text, old, new))):
        return 0
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(len(new) - len(old), 0)


def check_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A str or int method whose result grows with its arguments, sized before it runs; returns the arguments to
    call it with (`join`'s iterable, taken once)."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", None)
    budget = current()
    if isinstance(owner, (str, bytes)):
        if name in ("ljust", "rjust", "center", "zfill"):
            check_sizes([*args, *kwargs.values()])
        elif name == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            if isinstance(tabsize, int):
                tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
                budget.check_size(len(owner) + tabs * tabsize, "the expanded value")
        elif name == "replace" and len(args) >= 2:
            budget.check_size(_replaced_size(owner, *args[:3]), "the replaced value")
        elif name == "join" and len(args) == 1:
            return (bounded_items(args[0], len(owner), "the joined value"),)
        elif name == "translate" and args and isinstance(args[0], Mapping):
            longest = max((size(v) for v in args[0].values()), default=1)
            budget.check_size(len(owner) * longest, "the translated value")
    elif isinstance(owner, int) and name == "to_bytes":
        check_sizes([*args[:1], kwargs.get("length")])
    return args


# Filters that do not turn their value into text (the rest do, and a container's text is sized first).
_KEEP_VALUE = frozenset({"abs", "attr", "attribute", "batch", "count", "d", "default", "dictsort", "first", "float",
                         "groupby", "int", "items", "last", "length", "list", "map", "max", "min", "random",
                         "reject", "rejectattr", "reverse", "round", "select", "selectattr", "slice", "sort", "sum",
                         "unique", "filesizeformat"})


def _indent_size(a: dict[str, Any]) -> int:
    text, width = str(a["s"]), a["width"]
    return len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else size(width))


def _wordwrap_size(a: dict[str, Any]) -> int:
    text, wrapstring = str(a["s"]), a["wrapstring"]
    return len(text) * (1 + len(wrapstring)) if isinstance(wrapstring, str) else 0  # at most a line per character


# Per filter: the size of its result, from its arguments by name, checked before it runs.
_FILTER_SIZES = {
    "center": lambda a: a["width"],
    "truncate": lambda a: a["length"],
    "slice": lambda a: a["slices"],
    "batch": lambda a: a["linecount"],
    "indent": _indent_size,
    "wordwrap": lambda a: max(_wordwrap_size(a), a["width"] if isinstance(a["width"], int) else 0),
    "replace": lambda a: _replaced_size(str(a["s"]), a["old"], a["new"], a["count"]),
}


@functools.cache
def _parameters(function: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """A filter's positional parameter names and its defaults (inspect's bind() is slow for every call)."""
    parameters = inspect.signature(function).parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (tuple(p.name for p in parameters if p.kind in positional),
            {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty})


def _named(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names, defaults = _parameters(function)
    return {**defaults, **dict(zip(names, args)), **kwargs}


Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def check_filter(name: str, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Arguments:
    """A filter's result sized from its arguments before it runs; returns the arguments to call it with (`join`'s
    and `sum`'s iterables, taken once)."""
    budget = current()
    budget.check_time()
    if name not in _KEEP_VALUE:  # each argument may be turned into text (the value, a separator, a replacement)
        skip = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context or environment jinja passes first
        for value in (*args[skip:], *kwargs.values()):
            check_text(value, f"a value given to the '{name}' filter")
    if name not in _FILTER_SIZES and name not in ("format", "join", "sum"):
        return args, kwargs
    if name == "format":  # format(value, *args, **kwargs): `value % (kwargs or args)`
        check_percent(args[0] if args else None, kwargs or tuple(args[1:]))
        return args, kwargs
    a = _named(function, args, kwargs)
    if name == "join":
        items = a["value"]
        if a["attribute"] is not None:
            items = map(make_attrgetter(a["eval_ctx"].environment, a["attribute"]), items)
        return (a["eval_ctx"], bounded_items(items, len(str(a["d"])), "the joined value"), a["d"]), {}
    elif name == "sum":
        if not isinstance(a["start"], (int, float)):  # adding lists or strings: every partial sum is a copy
            items = a["iterable"]
            if a["attribute"] is not None:
                items = map(make_attrgetter(a["environment"], a["attribute"]), items)
            items = bounded_items(items, 0, "the sum")
            return (a["environment"], items, None, a["start"]), {}
    else:
        result = _FILTER_SIZES[name](a)
        if isinstance(result, int) and not isinstance(result, bool):
            budget.check_size(result, f"the result of the '{name}' filter")
    return args, kwargs


