"""Outbound HTTP for workflow nodes: only allow-listed hosts, checked again on every redirect hop."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx


class OutboundRefused(ValueError):
    """A URL the policy does not allow; the message names the host and how to allow it."""


@dataclass(frozen=True)
class OutboundPolicy:
    """Hosts a node may call: exact names (`api.example.com`, `127.0.0.1:8080`) or `*.example.com` suffixes."""

    allowed_hosts: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ("http", "https")

    @classmethod
    def parse(cls, hosts: str | Iterable[str]) -> OutboundPolicy:
        """From `FLOWGATE_HTTP_ALLOWED_HOSTS`: a comma-separated list."""
        items = hosts.split(",") if isinstance(hosts, str) else hosts
        return cls(tuple(h.strip().lower() for h in items if h.strip()))

    def check(self, url: str) -> httpx.URL:
        """The parsed URL, or OutboundRefused."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise OutboundRefused(f"not a valid URL: {url!r} ({exc})") from None
        if parsed.scheme not in self.schemes:
            raise OutboundRefused(f"scheme {parsed.scheme or '(none)'!r} is not allowed (allowed: {', '.join(self.schemes)})")
        host = (parsed.host or "").lower().rstrip(".")
        if not host:
            raise OutboundRefused(f"URL {url!r} has no host")
        with_port = f"{host}:{parsed.port}" if parsed.port else host
        for allowed in self.allowed_hosts:
            if allowed in (host, with_port):
                return parsed
            if allowed.startswith("*.") and host.endswith(allowed[1:]):
                return parsed
        raise OutboundRefused(f"host {with_port!r} is not on the allow-list (FLOWGATE_HTTP_ALLOWED_HOSTS)")

    def request(self, client: httpx.Client, method: str, url: str, max_redirects: int = 5,
                **kwargs: object) -> httpx.Response:
        """Send the request, following redirects by hand so every hop's host is checked before it is called."""
        target = self.check(url)
        for _ in range(max_redirects + 1):
            response = client.request(method, target, follow_redirects=False, **kwargs)
            if not response.is_redirect:
                return response
            location = response.headers.get("Location", "")
            target = self.check(urljoin(str(target), location))
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("json", "content", "data")}
        raise OutboundRefused(f"more than {max_redirects} redirects from {url!r}")
