"""API keys and scopes: who may call what. Keys are kept as SHA-256 digests and compared in constant time.

    FLOWGATE_API_KEYS="backend:<key>:read+trigger,ops:<key>:admin"
    FLOWGATE_API_KEYS_FILE=keys.txt     lines of `<name> sha256:<hex digest> <scope>[+<scope>]`
    python -m app keys hash <key>       prints the digest for such a file
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from flask import Flask, current_app, g, request

from app.config import ConfigError
from app.errors import Problem, TooManyRequests

SCOPES = ("read", "trigger", "admin")
OPEN_PATHS = frozenset({"/health"})
# The dashboard's static files hold no data; every API call the page makes still needs a key.
OPEN_PREFIXES = ("/ui/",)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
V = TypeVar("V", bound=Callable[..., object])


class Unauthorized(Problem):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(Problem):
    status, code, title = 403, "forbidden", "Forbidden"


def digest(key: str) -> bytes:
    """The SHA-256 digest a key is kept and compared as."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    """A caller: its name (for logs and rate limits, never the key), the key's digest and its scopes."""

    name: str
    digest: bytes
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """Whether the key holds `scope` (several joined by '+': each of them)."""
        return "admin" in self.scopes or all(one in self.scopes for one in scope.split("+"))


def _scopes(text: str, where: str) -> frozenset[str]:
    scopes = frozenset(s for s in text.split("+") if s)
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise ConfigError(f"{where}: scopes must be one or more of {', '.join(SCOPES)} joined by '+' "
                          f"(got {text!r})")
    return scopes


class KeyRing:
    """The configured keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self.keys = tuple(keys)
        names = [key.name for key in self.keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"API key names must be unique: {', '.join(duplicates)}")

    @classmethod
    def parse(cls, env_value: str | None, file: Path | None) -> KeyRing:
        """From FLOWGATE_API_KEYS (plain keys) and FLOWGATE_API_KEYS_FILE (digests); errors never echo a key."""
        keys = []
        for index, entry in enumerate(e.strip() for e in (env_value or "").split(",")):
            if not entry:
                continue
            parts = entry.split(":")
            where = f"FLOWGATE_API_KEYS entry {index + 1}"
            if len(parts) != 3 or not _NAME.match(parts[0]) or len(parts[1]) < 16:
                raise ConfigError(f"{where}: expected <name>:<key of 16+ characters>:<scopes>")
            keys.append(ApiKey(parts[0], digest(parts[1]), _scopes(parts[2], where)))
        if file is not None:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(f"FLOWGATE_API_KEYS_FILE: cannot read {file}: {exc.strerror}") from None
            for number, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                where = f"FLOWGATE_API_KEYS_FILE {file}:{number}"
                match = _DIGEST.match(parts[1]) if len(parts) == 3 else None
                if match is None or not _NAME.match(parts[0]):
                    raise ConfigError(f"{where}: expected <name> sha256:<64 hex digits> <scopes>")
                keys.append(ApiKey(parts[0], bytes.fromhex(match[1]), _scopes(parts[2], where)))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, presented: str) -> ApiKey | None:
        """The key matching `presented`; every stored digest is compared, in constant time each."""
        candidate = digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.digest):
                found = key
        return found


def presented_key() -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Key") or None


ANY_SCOPE_PATHS = frozenset({"/api/v1/whoami"})  # any valid key may ask what it may do


def requires(scope: str) -> Callable[[V], V]:
    """Mark a view as needing `scope` rather than what its method implies (`admin` to pause a schedule;
    `read+trigger`, both, to run a source and see its rows)."""
    def mark(view: V) -> V:
        view.required_scope = scope  # type: ignore[attr-defined]
        return view

    return mark


def required_scope() -> str | None:
    """What the view says (`requires`); else reading (GET, HEAD) needs `read`, anything that starts, cancels or
    runs something needs `trigger`, and asking what one's own key may do needs a valid key only (None)."""
    if request.path in ANY_SCOPE_PATHS:
        return None
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    marked = getattr(view, "required_scope", None)
    if marked:
        return marked
    return "read" if request.method in ("GET", "HEAD", "OPTIONS") else "trigger"


def is_open(path: str) -> bool:
    """Whether `path` is served without a key: liveness and the dashboard's files (`/ui` redirects to `/ui/`)."""
    return path in OPEN_PATHS or path == "/ui" or path.startswith(OPEN_PREFIXES)


class FailedAuthLimit:
    """Wrong keys per client address (FLOWGATE_AUTH_FAILURE_LIMIT): past the limit, a request from that address
    without a right key is a 429. A right key is always served: callers behind one proxy or NAT share an address,
    and one of them sending wrong keys must not lock out the others. (What stops guessing is a key's 16+
    characters; the limit keeps a misconfigured or hostile client's failures cheap and tells it to back off.)
    The address is the socket's, or with FLOWGATE_TRUSTED_PROXIES the one the outermost trusted proxy saw.
    Counts live in FLOWGATE_RATE_LIMIT_STORAGE when set (shared by every process), else in this process."""

    def __init__(self, limit: str, storage_uri: str | None):
        from limits import parse_many, storage, strategies

        self.items = parse_many(limit)
        self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_uri or "memory://"))

    def refuse_if_over(self, address: str) -> None:
        """A 429 problem when `address` already used up its wrong keys."""
        for item in self.items:
            if not self.limiter.test(item, "flowgate-auth-failures", address):
                reset, _ = self.limiter.get_window_stats(item, "flowgate-auth-failures", address)
                retry_after = max(int(reset - time.time()) + 1, 1)
                raise TooManyRequests(f"too many requests with a wrong API key from this address; retry in "
                                      f"{retry_after} s (FLOWGATE_AUTH_FAILURE_LIMIT)",
                                      code="too_many_failed_authentications",
                                      headers={"Retry-After": str(retry_after)})

    def failed(self, address: str) -> None:
        for item in self.items:
            self.limiter.hit(item, "flowgate-auth-failures", address)


def init_app(app: Flask, keyring: KeyRing, failure_limit: str = "10/minute", storage_uri: str | None = None) -> None:
    """Check every request but /health and the dashboard's files against the keyring (when it has keys); limit
    wrong keys per client address."""
    failures = FailedAuthLimit(failure_limit, storage_uri) if keyring.enabled else None

    @app.before_request
    def authenticate() -> None:
        g.api_key = None
        if not keyring.enabled or failures is None or is_open(request.path):  # failures: None without keys
            return
        presented = presented_key()
        key = keyring.identify(presented) if presented is not None else None
        if key is None:
            address = request.remote_addr or "unknown"
            failures.refuse_if_over(address)
            challenge = {"WWW-Authenticate": 'Bearer realm="flowgate"'}
            if presented is None:
                raise Unauthorized("an API key is required: Authorization: Bearer <key> or X-API-Key",
                                   code="missing_api_key", headers=challenge)
            failures.failed(address)
            raise Unauthorized("the API key is not valid", code="invalid_api_key", headers=challenge)
        scope = required_scope()
        if scope is not None and not key.allows(scope):
            raise Forbidden(f"API key '{key.name}' lacks the '{scope}' scope for {request.method} {request.path}",
                            code="insufficient_scope", required_scope=scope)
        g.api_key = key

