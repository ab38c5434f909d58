"""Node config templates: Jinja2 in a sandbox over `inputs`, `input` and earlier nodes' outputs."""
from __future__ import annotations

import functools
import re
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A value that is one expression and nothing else keeps its type ("{{ nodes.a.output }}" stays a dict).
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)


class TemplateFailed(ValueError):
    """A template in a node's config failed; names the field, the expression and why."""

    def __init__(self, field: str, expression: str, reason: str):
        super().__init__(f"template error in {field}: {expression!r}: {reason}")
        self.field = field
        self.expression = expression
        self.reason = reason


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # Immutable sandbox: templates can read the context but neither call unsafe attributes nor mutate lists/dicts.
    # StrictUndefined: a typo is an error naming the missing attribute, not an empty string; `default` still works.
    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def has_template(value: Any) -> bool:
    """True when `value` (or anything inside it) contains a template."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    return False


def render(value: Any, context: dict[str, Any], field: str = "config") -> Any:
    """`value` with every template string rendered against `context`; dicts and lists are walked."""
    if isinstance(value, dict):
        return {key: render(item, context, f"{field}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context, f"{field}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str) or not has_template(value):
        return value
    env = _environment()
    try:
        whole = _WHOLE_EXPRESSION.match(value)
        if whole:
            result = env.compile_expression(whole["expr"], undefined_to_none=False)(**context)
            if isinstance(result, StrictUndefined):
                str(result)  # raises UndefinedError naming what is missing
            return result
        return env.from_string(value).render(**context)
    except TemplateError as exc:
        raise TemplateFailed(field, value, f"{type(exc).__name__}: {exc.message or exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateFailed(field, value, f"{type(exc).__name__}: {exc}") from None
