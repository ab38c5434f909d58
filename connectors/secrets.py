"""Secrets a process knows by construction: the values its `${VAR}` references resolved to, scrubbed wherever
text leaves it (responses, run records, run logs, stdout).

`substitute_env` records every value it fills in from the environment (connectors.yaml, workflow files, in
the gateway and in a Prefect worker alike); `scrub` replaces each of them, also URL-encoded, with `***`.
`redact` and `redact_text` also hide what looks secret by its name (`X-API-Key`, `?password=`, `Bearer …`).
"""
from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import quote, quote_plus

from connectors.nesting import MAX_DEPTH, NestedTooDeep

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


def scrub(value: Any, _depth: int = 1) -> Any:
    """`value` (a JSON-like structure) with every remembered secret in its strings (and keys) replaced;
    NestedTooDeep past connectors.nesting.MAX_DEPTH levels."""
    if not _values:
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, (dict, list, tuple)) and _depth > MAX_DEPTH:
        raise NestedTooDeep(MAX_DEPTH)
    if isinstance(value, dict):
        return {scrub_text(k) if isinstance(k, str) else k: scrub(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, _depth + 1) for v in value]
    return value


# The folders of an absolute path (at the start, after a space, quote, bracket or `=`, or in `sqlite:////...`);
# URLs (`https://host/a/b`) do not match: their first slash follows a colon or a slash.
_FOLDERS = re.compile(r"(?:(?<=^)|(?<=[\s'\"(\[=,])|(?<=:///))(?:/[\w.\-~+@]+)+/(?=[\w.\-~+@])")


def hide_paths(text: str) -> str:
    """`text` with the server's folders left out of absolute paths: `Engine(sqlite:////srv/x/shop.db)` reads
    `Engine(sqlite:///…/shop.db)`. For error messages, which callers read."""
    return _FOLDERS.sub("…/", text)


def public_error(value: Any, _depth: int = 1) -> Any:
    """An error document (or message) as a caller may see it: secrets scrubbed, server folders left out;
    NestedTooDeep past connectors.nesting.MAX_DEPTH levels."""
    if isinstance(value, str):
        return hide_paths(scrub_text(value))
    if isinstance(value, (dict, list)) and _depth > MAX_DEPTH:
        raise NestedTooDeep(MAX_DEPTH)
    if isinstance(value, dict):
        return {k: public_error(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [public_error(v, _depth + 1) for v in value]
    return value


# --- redaction by name: config fields and strings that look like secrets -----------------------------

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@\s]+)(?P<tail>@)", re.IGNORECASE)
# `name=value` inside a string: URL query (`?password=`), a path segment (`/apikey=...`), a connection string
# (`Server=db;Password=...;`). The value ends at the next separator (a path segment also at `/`).
_NAME_VALUE = re.compile(r"(?P<head>(?:^|[?&;/\s,])(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)\s*=\s*)(?P<value>[^&;#\s,?]+)")
_AUTH_SCHEME = re.compile(r"^(?P<scheme>bearer|basic|token|digest|apikey|sharedaccesssignature)\s+\S+",
                          re.IGNORECASE)
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
# Any one of these words in a field name marks its value secret: `X-API-Key`, `X-Auth`, `sig`, `client_secret`...
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "auth", "authorization", "apikey", "key",
    "sig", "signature", "credential", "credentials", "cookie", "bearer", "private", "session", "sessionid", "jwt",
    "otp", "sas", "dsn",
})
# ... as do these run together (`xapikey`, `accesskeyid` written in lower case).
_SECRET_RUNS = ("password", "passwd", "secret", "apikey", "accesskey", "privatekey", "secretkey", "authtoken",
                "accesstoken", "credential", "signature", "subscriptionkey", "sessionid", "sessiontoken")
# ... unless the name describes such a value rather than holding one (`token_url`, `api_key_name`, `key_type`),
# or the key is a data key (`primary_key`, `merge_key`).
_DESCRIPTORS = frozenset({"url", "uri", "endpoint", "type", "name", "location", "header", "param", "path", "field",
                          "expires", "expiry", "ttl", "length", "prefix", "placement", "in"})
_COUNTS = frozenset({"max", "min", "num", "total", "prompt", "completion", "count"})  # `max_tokens` is a number
_DATA_KEYS = frozenset({"primary", "foreign", "sort", "partition", "merge", "cursor", "unique", "natural",
                        "composite", "surrogate", "dedup", "row", "idempotency", "cache", "group", "join"})


def is_secret_name(name: str) -> bool:
    """Whether a field, header or parameter called `name` holds a secret (`X-API-Key`, `access_key`, `sig`,
    `Ocp-Apim-Subscription-Key`, `Password`, `client_secret`), by a broad match on the words in it."""
    words = [w.lower() for w in _WORDS.findall(name)]
    if not words:
        return False
    if words[-1] in _DESCRIPTORS and len(words) > 1:
        return False
    singular = [w[:-1] if w.endswith("s") and w[:-1] in _SECRET_WORDS else w for w in words]
    for index, word in enumerate(singular):
        if word in _SECRET_WORDS:
            before = singular[index - 1] if index else ""
            if (word == "key" and before in _DATA_KEYS) or before in _COUNTS:
                continue
            return True
    compact = "".join(words)
    return any(run in compact for run in _SECRET_RUNS)


def redact_text(text: str) -> str:
    """A string with the secrets inside it replaced by ***: remembered `${VAR}` values, a URL's password,
    `name=value` pairs with a secret name (query strings, path segments, connection strings) and the
    credentials after an auth scheme (`Bearer ...`)."""
    text = scrub_text(text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED + m["tail"], text)

    def pair(match: re.Match[str]) -> str:
        if not is_secret_name(match["name"]):
            return match[0]
        value = match["value"]
        rest = value[value.index("/"):] if match["head"].startswith("/") and "/" in value else ""
        return match["head"] + REDACTED + _NAME_VALUE.sub(pair, rest)

    text = _NAME_VALUE.sub(pair, text)
    return _AUTH_SCHEME.sub(lambda m: f"{m['scheme']} {REDACTED}", text)


def redact(value: Any, key: str = "", _depth: int = 1) -> Any:
    """Replace secret values with ***: anything under a secret-looking name (`is_secret_name`), and inside
    every string what `redact_text` finds (`${VAR}` values, URL passwords, `password=` pairs...);
    NestedTooDeep past connectors.nesting.MAX_DEPTH levels."""
    if isinstance(value, (dict, list)) and _depth > MAX_DEPTH:
        raise NestedTooDeep(MAX_DEPTH)
    if isinstance(value, dict):
        return {k: redact(v, k, _depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key, _depth + 1) for v in value]
    if key and value is not None and not isinstance(value, bool) and is_secret_name(key):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value
