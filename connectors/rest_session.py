"""The HTTP session of a rest_api source: every request it sends (each page, each redirect hop) passes the outbound
allow-list, and the connector's credentials go only to the origin of its own base_url.

dlt follows whatever next-page URL an API answers (a `Link` header, a `next` field) with the client's auth, and
requests re-applies that auth to every request it prepares; an upstream that points elsewhere would otherwise get
the token, and a way into the internal network. The check sits in the transport adapter, under dlt's retries and
requests' redirect handling, so no request leaves without it."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response

from connectors.outbound import OutboundPolicy, OutboundRefused

# Headers that carry credentials whatever the connector declares (requests drops Authorization on a redirect to
# another host, but not a next-page URL dlt follows, nor an API key header of another name).
_ALWAYS_SECRET = ("authorization", "proxy-authorization", "cookie")


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").rstrip("."), parts.port or {"http": 80, "https": 443}.get(scheme)


class AllowListAdapter(HTTPAdapter):
    """A requests transport that refuses a URL the policy does not allow, and strips credentials from a request to
    any origin but `home`."""

    __attrs__ = [*HTTPAdapter.__attrs__, "policy", "home", "secret_headers", "secret_params"]

    def __init__(self, policy: OutboundPolicy, home: str, secret_headers: Iterable[str] = (),
                 secret_params: Iterable[str] = ()) -> None:
        self.policy = policy
        self.home = origin(home)
        self.secret_headers = frozenset({*_ALWAYS_SECRET, *(name.lower() for name in secret_headers)})
        self.secret_params = frozenset(secret_params)
        super().__init__()

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        """Check the URL, drop the credentials when it leaves the home origin, then send."""
        try:
            self.policy.check(request.url or "")
        except OutboundRefused as exc:
            raise OutboundRefused(f"{exc} (FLOWGATE_HTTP_ALLOWED_HOSTS)") from None
        if origin(request.url or "") != self.home:
            for name in [name for name in request.headers if name.lower() in self.secret_headers]:
                del request.headers[name]
            if self.secret_params:
                parts = urlsplit(request.url or "")
                query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                         if k not in self.secret_params]
                request.url = urlunsplit(parts._replace(query=urlencode(query)))
        return super().send(request, *args, **kwargs)


def guarded_session(config: dict[str, Any], policy: OutboundPolicy) -> Any:
    """A session for `config` (dlt's RESTAPIConfig) with dlt's retries, sending through AllowListAdapter: the
    headers the client declares and every api_key auth's header or query parameter count as credentials."""
    from dlt.sources.helpers.requests.retry import Client

    client = config["client"]
    headers: set[str] = set(client.get("headers") or {})
    params: set[str] = set()
    for auth in _auths(config):
        if isinstance(auth, dict) and auth.get("type") == "api_key":
            (params if auth.get("location") in ("query", "param") else headers).add(auth.get("name", "Authorization"))
    session = Client(raise_for_status=False).session  # as dlt's RESTClient makes its own
    adapter = AllowListAdapter(policy, client["base_url"], headers, params)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _auths(config: dict[str, Any]) -> Iterator[Any]:
    """Every auth the config declares: the client's, the resource defaults' and each resource's endpoint's."""
    yield config["client"].get("auth")
    endpoints = [(config.get("resource_defaults") or {}).get("endpoint")]
    endpoints += [resource.get("endpoint") for resource in config.get("resources") or [] if isinstance(resource, dict)]
    for endpoint in endpoints:
        if isinstance(endpoint, dict):
            yield endpoint.get("auth")
