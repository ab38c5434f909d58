"""What a web page in a browser on the gateway's machine may ask of a gateway without API keys: nothing.

Without keys the gateway serves loopback only (app/exposure.py), but a browser on that machine reaches loopback
for any page it shows. Two holes follow, closed here for a keyless gateway (with keys, a page has no key to send):

* DNS rebinding: a page on `attacker.example` re-points its own name at 127.0.0.1 and then reads the gateway's
  answers as same-origin. Its requests carry `Host: attacker.example`, so only names that cannot be re-pointed
  are served: `localhost` and `*.localhost` (RFC 6761), IP addresses (a page whose origin is an IP address is
  served by that address), and FLOWGATE_SERVER_NAMES. Anything else is a 421.
* Cross-site requests: a page on another origin (another port of localhost included) can POST without asking
  first (no CORS preflight) when the body is text/plain, a form, or nothing. JSON endpoints refuse other bodies
  (app/api/inputs.py, 415); here, any request but a read that says it comes from another origin is a 403.

/health is left open to both checks: it reads nothing, and probes name the gateway as they please.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from flask import Flask, request

from app.auth import Forbidden
from app.errors import Problem, field_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UNCHECKED_PATHS = frozenset({"/health"})


class MisdirectedRequest(Problem):
    status, code, title = 421, "unknown_host", "Misdirected Request"


def host_name(host: str) -> str:
    """The name of a Host header's value, without port, brackets or a trailing dot, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def served_name(name: str, server_names: tuple[str, ...]) -> bool:
    """Whether a keyless gateway answers requests for `name`: loopback names, IP addresses, configured names
    (`api.example.com`, or `*.example.com` for the names under it)."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name.split("%")[0])
        return True
    except ValueError:
        pass
    return any(name == entry or (entry.startswith("*.") and name.endswith(entry[1:])) for entry in server_names)


def init_app(app: Flask, keys_enabled: bool, server_names: tuple[str, ...]) -> None:
    """Without keys, refuse a Host the gateway does not serve (421) and a cross-origin request that could change
    something (403)."""
    if keys_enabled:
        return

    @app.before_request
    def check_host_and_origin() -> None:
        if request.path in UNCHECKED_PATHS:
            return
        host = request.host
        if not served_name(host_name(host), server_names):
            message = (f"{host[:100]!r} is not a name this gateway answers to without API keys (loopback names, IP "
                       "addresses and FLOWGATE_SERVER_NAMES)")
            raise MisdirectedRequest(f"Host: {message}", errors=[field_error("Host", message)])
        origin = request.headers.get("Origin")
        if origin is None or request.method in SAFE_METHODS:
            return
        if urlsplit(origin).netloc.lower() != host.lower():
            message = (f"{origin[:100]!r} is another origin than the gateway's: a gateway without API keys takes "
                       "no requests from other web pages")
            raise Forbidden(f"Origin: {message}", code="cross_origin_refused", errors=[field_error("Origin", message)])
