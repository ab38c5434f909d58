"""Secrets a process knows by construction: the values its `${VAR}` references resolved to, scrubbed wherever
text leaves it (responses, run records, run logs, stdout).

`substitute_env` records every value it fills in from the environment (connectors.yaml, workflow files, in
the gateway and in a Prefect worker alike); `scrub` replaces each of them, also URL-encoded, with `***`.
"""
from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "***"
MIN_LENGTH = 4  # shorter values ("1", "on") would blank out ordinary text; they are no secret worth the name

_lock = threading.Lock()
_values: tuple[str, ...] = ()


def remember(value: str) -> None:
    """Treat `value` (and its URL-encoded spellings) as a secret from now on, in this process."""
    global _values
    if not isinstance(value, str) or len(value) < MIN_LENGTH:
        return
    spellings = {value, quote(value, safe=""), quote_plus(value), quote(value)}
    with _lock:
        if value in _values:
            return
        # Longest first: a secret that contains another is replaced whole.
        _values = tuple(sorted(set(_values) | spellings, key=len, reverse=True))


def known() -> tuple[str, ...]:
    """Every secret value remembered so far (for tests and diagnostics: never print them)."""
    return _values


def scrub_text(text: str) -> str:
    """`text` with every remembered secret replaced by ***."""
    for value in _values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def scrub(value: Any) -> Any:
    """`value` (a JSON-like structure) with every remembered secret in its strings (and keys) replaced."""
    if not _values:
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {scrub_text(k) if isinstance(k, str) else k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


# The folders of an absolute path (at the start, after a space, quote, bracket or `=`, or in `sqlite:////...`);
# URLs (`https://host/a/b`) do not match: their first slash follows a colon or a slash.
_FOLDERS = re.compile(r"(?:(?<=^)|(?<=[\s'\"(\[=,])|(?<=:///))(?:/[\w.\-~+@]+)+/(?=[\w.\-~+@])")


def hide_paths(text: str) -> str:
    """`text` with the server's folders left out of absolute paths: `Engine(sqlite:////srv/x/shop.db)` reads
    `Engine(sqlite:///…/shop.db)`. For error messages, which callers read."""
    return _FOLDERS.sub("…/", text)


def public_error(value: Any) -> Any:
    """An error document (or message) as a caller may see it: secrets scrubbed, server folders left out."""
    if isinstance(value, str):
        return hide_paths(scrub_text(value))
    if isinstance(value, dict):
        return {k: public_error(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_error(v) for v in value]
    return value
