"""Failure classes: whether running a failed run again can help, decided from the exception itself, and the retry
policy that acts on them.

- `transient`: the cause may pass (a network error, a timeout, HTTP 429 or 5xx, a database unreachable or locked,
  a lost lease): the same run, started again later, may well succeed.
- `crashed`: the run was cut off from outside (its process died, it was interrupted at shutdown, its lease lapsed):
  nothing is known to be wrong with the run itself.
- `terminal`: running it again runs the same code on the same data and configuration and fails the same way
  (bad config or credentials, a 4xx, a missing table or file, a schema contract violation, a bug in a source).

Unknown exceptions are `terminal`: a retry must be earned by a cause known to pass, never assumed.
"""
from __future__ import annotations

import errno
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TRANSIENT: Final = "transient"
CRASHED: Final = "crashed"
TERMINAL: Final = "terminal"
FAILURE_CLASSES = (TRANSIENT, CRASHED, TERMINAL)
RetryableClass = Literal["transient", "crashed"]
_RETRIED_BY_DEFAULT: tuple[RetryableClass, ...] = (TRANSIENT, CRASHED)


@dataclass(frozen=True)
class Failure:
    """What a failure is: its class and a short reason naming the cause (`HTTP 503 from the source`)."""

    failure_class: str
    reason: str

    @property
    def terminal(self) -> bool:
        """True when a retry cannot help."""
        return self.failure_class == TERMINAL


# Messages of drivers that raise one exception type for every cause (psycopg's OperationalError, DuckDB's
# IOException, SQLite's OperationalError); the first pattern that matches decides. Checked on each exception of the
# chain, outermost first.
_MESSAGES: list[tuple[re.Pattern[str], str, str]] = [(re.compile(pattern, re.IGNORECASE), cls, reason) for
                                                     pattern, cls, reason in (
    (r"password authentication failed|authentication failed|role \S+ does not exist|no password supplied"
     r"|access denied|invalid (username|password|credentials)", TERMINAL, "credentials refused"),
    (r"database \S+ does not exist|unknown database", TERMINAL, "database does not exist"),
    (r"requested table\(s\) not available|no such table|relation \S+ does not exist|table \S+ does not exist",
     TERMINAL, "table not found"),
    (r"temporary failure in name resolution|\[Errno -3\]", TRANSIENT, "host name lookup failed for now"),
    (r"could not translate host name|name or service not known|nodename nor servname|\[Errno -2\]"
     r"|failed to resolve|getaddrinfo failed", TERMINAL, "unknown host"),
    (r"database is locked|could not set lock on file|conflicting lock", TRANSIENT, "database locked"),
    (r"unable to open database file", TERMINAL, "database file cannot be opened"),
    (r"connection refused", TRANSIENT, "connection refused"),
    (r"timed out|timeout expired|timeout", TRANSIENT, "timeout"),
    (r"connection reset|server closed the connection|connection (was )?(lost|aborted|closed)|broken pipe"
     r"|the database system is (starting up|shutting down)|too many (connections|clients)"
     r"|terminating connection|could not connect|network is unreachable|no route to host",
     TRANSIENT, "database or network unreachable"),
)]

# Exception classes known by name (any class in the exception's MRO), so this module imports neither dlt, requests
# nor a database driver.
_NAMES: dict[str, tuple[str, str]] = {
    "DestinationTransientException": (TRANSIENT, "the destination failed for now"),
    "DestinationTerminalException": (TERMINAL, "the destination refused the load"),
    "DataValidationError": (TERMINAL, "schema contract violation"),
    "SchemaFrozenException": (TERMINAL, "schema contract violation"),
    "ConfigFieldMissingException": (TERMINAL, "configuration missing"),
    "NoSuchTableError": (TERMINAL, "table not found"),
    "LockLost": (TRANSIENT, "lost its lease"),
    "Timeout": (TRANSIENT, "timeout"),  # requests.Timeout
    "TimeoutException": (TRANSIENT, "timeout"),  # httpx
    "ConnectionRefusedError": (TRANSIENT, "connection refused"),
    "ConnectionResetError": (TRANSIENT, "connection reset"),
    "ConnectionAbortedError": (TRANSIENT, "connection aborted"),
    "BrokenPipeError": (TRANSIENT, "connection broken"),
    "TimeoutError": (TRANSIENT, "timeout"),
    "FileNotFoundError": (TERMINAL, "file not found"),
    "NotADirectoryError": (TERMINAL, "not a folder"),
    "IsADirectoryError": (TERMINAL, "a folder, not a file"),
    "PermissionError": (TERMINAL, "permission denied"),
}
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE}


def classify(exc: BaseException) -> Failure:
    """The class of the failure `exc` (with the exceptions it wraps): transient or terminal. An exception nothing
    here knows, a bug in a source's code or data, is terminal."""
    for link in _chain(exc):
        failure = _status(link) or _by_name(link) or _by_errno(link) or _by_message(link)
        if failure is not None:
            return failure
    return Failure(TERMINAL, f"{type(_innermost(exc)).__name__} in the source (a retry runs the same code on the "
                             "same data)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: `__cause__`, `__context__` and dlt's `exception` attribute, outermost first."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        link = pending.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        for inner in (getattr(link, "exception", None), link.__cause__, link.__context__):
            if isinstance(inner, BaseException):
                pending.append(inner)


def _innermost(exc: BaseException) -> BaseException:
    return list(_chain(exc))[-1]


def _status(exc: BaseException) -> Failure | None:
    """An HTTP answer (requests' HTTPError, httpx's HTTPStatusError): 408, 429 and 5xx may pass, other 4xx won't."""
    code = getattr(getattr(exc, "response", None), "status_code", None)
    if not isinstance(code, int) or code < 400:
        return None
    if code in (408, 429) or code >= 500:
        return Failure(TRANSIENT, f"HTTP {code} from the source")
    what = {401: "credentials refused", 403: "access forbidden", 404: "not found"}.get(code, "request refused")
    return Failure(TERMINAL, f"HTTP {code} from the source ({what})")


def _by_name(exc: BaseException) -> Failure | None:
    for cls in type(exc).__mro__:
        if cls.__name__ in _NAMES:
            failure_class, reason = _NAMES[cls.__name__]
            return Failure(failure_class, reason)
    return None


def _by_errno(exc: BaseException) -> Failure | None:
    if isinstance(exc, socket.gaierror):
        transient = exc.errno == socket.EAI_AGAIN  # the resolver could not answer now; EAI_NONAME: no such host
        return Failure(TRANSIENT, "host name lookup failed for now") if transient else Failure(TERMINAL, "unknown host")
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return Failure(TRANSIENT, f"network error ({errno.errorcode.get(exc.errno, exc.errno)})")
    return None


def _by_message(exc: BaseException) -> Failure | None:
    text = str(exc)
    for pattern, failure_class, reason in _MESSAGES:
        if pattern.search(text):
            return Failure(failure_class, reason)
    return None


class RetryPolicy(BaseModel):
    """When a failed run is started again, under the same run id: at most `max_attempts` attempts in all, after a
    wait of `backoff_seconds` doubling per attempt up to `max_backoff_seconds`, and only for the classes in `on`
    (a terminal failure ends the run at once)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_attempts: int = Field(3, ge=1, le=10, description="Attempts in all, the first included (1: no retry).")
    backoff_seconds: float = Field(30.0, ge=0, le=3600, description="Wait before the second attempt; doubles.")
    max_backoff_seconds: float = Field(600.0, ge=0, le=86400, description="Longest wait between two attempts.")
    on: list[RetryableClass] = Field(default_factory=lambda: list(_RETRIED_BY_DEFAULT), min_length=1, max_length=2,
                                     description="Failure classes that are retried: transient, crashed.")

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        # Strict, as every request model: but JSON Schema counts 2.0 as an integer, and YAML's 30 as a number.
        if isinstance(data, dict):
            # YAML 1.1 (PyYAML) reads a bare `on:` key as the boolean true: `retry: {on: [transient]}` means "on".
            data = {"on" if key is True and "on" not in data else key: value for key, value in data.items()}
            if isinstance(data.get("max_attempts"), float) and data["max_attempts"].is_integer():
                data["max_attempts"] = int(data["max_attempts"])
            for key in ("backoff_seconds", "max_backoff_seconds"):
                if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
                    data[key] = float(data[key])
        return data

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` (1-based) failed."""
        return min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)

    def retries(self, failure_class: str | None, attempt: int) -> bool:
        """Whether attempt number `attempt`, failed with `failure_class`, is followed by another."""
        return failure_class in self.on and attempt < self.max_attempts
