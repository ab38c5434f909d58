"""Outbound HTTP (workflow `http` nodes, rest_api connectors, run callbacks): allow-listed hosts only, never a way
into the internal network, checked again on every redirect hop. On the lowest floor: connectors call out too."""
from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

from connectors import tracing

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(ValueError):
    """A URL the policy does not allow; the message names the host and how to allow it."""


class ResponseTooLarge(ValueError):
    """A response body past the reader's cap; the message names the limit."""


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The certificate-verifying TLS context every flowgate HTTP client shares, the one httpx would make for each
    (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR): loading the roots costs some 20 ms of CPU per client, and
    each app, toolbox and LLM provider makes a client. An SSLContext is safe to share between threads."""
    return httpx.create_ssl_context()


def literal_ip(host: str) -> Address | None:
    """The address a host names literally, in any spelling a resolver accepts: 127.0.0.1, 2130706433,
    0x7f000001, 0177.0.0.1, 127.1, ::1, ::ffff:127.0.0.1. None for a name."""
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))  # the loose forms libc accepts too
        except (OSError, ValueError):
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# Ranges `is_global` leaves to the internet that reach it only through a relay or translator a network may run
# itself: 6to4 (2002::/16 carries an IPv4 address, 2002:a9fe:a9fe:: is the metadata service's) and its relays'
# anycast (192.88.99.0/24), both deprecated by RFC 7526.
_RELAYED = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("192.88.99.0/24"))
# NAT64 prefixes (RFC 6052, RFC 8215): the last 32 bits are the IPv4 address the translator connects to.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped, 6to4, Teredo's client, NAT64 or IPv4-compatible."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if address.teredo:
        return address.teredo[1]
    if any(address in network for network in _NAT64) or int(address) >> 32 == 0:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def internal(address: Address) -> bool:
    """Anything but the public internet: loopback, private, shared (100.64.0.0/10: Alibaba Cloud's metadata at
    100.100.100.200), link-local (cloud metadata), unspecified, reserved, multicast, 6to4, and an IPv6 address
    whose embedded IPv4 address is one of those."""
    embedded = embedded_ipv4(address)
    if embedded is not None and internal(embedded):
        return True
    return (not address.is_global or address.is_loopback or address.is_private or address.is_link_local
            or address.is_unspecified or address.is_reserved or address.is_multicast
            or any(address in network for network in _RELAYED))


def _resolve(host: str) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return []
    # an IP family's socket address starts with the address as text (typeshed allows AF_PACKET's int too)
    return [a for a in (literal_ip(str(info[4][0]).split("%")[0]) for info in infos) if a is not None]


def _split(allowed: str) -> tuple[str, int | None]:
    """An allow-list entry as (host, port or None): `host`, `host:port`, `[v6]:port`, or a bare IPv6 address."""
    if allowed.startswith("["):
        host, _, rest = allowed[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if allowed.count(":") == 1:
        host, _, port = allowed.partition(":")
        return host, int(port) if port.isdigit() else None
    return allowed, None


@dataclass(frozen=True)
class OutboundPolicy:
    """Hosts that may be called: exact names or addresses (`api.example.com`, `127.0.0.1:8080`) or `*.example.com`.

    An address inside the internal network (loopback, private, link-local, ...) is refused unless it is itself
    on the list, whether the URL names it literally (in any encoding) or a listed name resolves to it.
    """

    allowed_hosts: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ("http", "https")
    resolve: Callable[[str], list[Address]] = field(default=_resolve, compare=False)

    @classmethod
    def parse(cls, hosts: str | Iterable[str]) -> OutboundPolicy:
        """From a comma-separated list (FLOWGATE_HTTP_ALLOWED_HOSTS, FLOWGATE_CALLBACK_ALLOWED_HOSTS)."""
        items = hosts.split(",") if isinstance(hosts, str) else hosts
        return cls(tuple(h.strip().lower() for h in items if h.strip()))

    def _listed(self, host: str, port: int) -> bool:
        address = literal_ip(host)
        for allowed in self.allowed_hosts:
            allowed_host, allowed_port = _split(allowed)
            if allowed_port is not None and allowed_port != port:
                continue
            if allowed_host.startswith("*."):
                if address is None and host.endswith(allowed_host[1:]):
                    return True
                continue
            allowed_address = literal_ip(allowed_host)
            if (address == allowed_address) if allowed_address is not None else (allowed_host == host):
                return True
        return False

    def check(self, url: str) -> httpx.URL:
        """The parsed URL, or OutboundRefused naming why."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise OutboundRefused(f"not a valid URL: {url!r} ({exc})") from None
        if parsed.scheme not in self.schemes:
            raise OutboundRefused(f"scheme {parsed.scheme or '(none)'!r} is not allowed "
                                  f"(allowed: {', '.join(self.schemes)})")
        host = (parsed.host or "").lower().rstrip(".")
        if not host:
            raise OutboundRefused(f"URL {url!r} has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        shown = f"{host}:{port}"
        if not self._listed(host, port):
            raise OutboundRefused(f"host {shown!r} is not on the allow-list")
        if literal_ip(host) is None:
            hidden = [a for a in self.resolve(host) if internal(a) and not self._listed(str(a), port)]
            if hidden:
                raise OutboundRefused(f"host {shown!r} resolves to an internal address ({hidden[0]}), "
                                      "which is not on the allow-list itself")
        return parsed

    def request(self, client: httpx.Client, method: str, url: str, max_redirects: int = 5,
                max_body_bytes: int | None = None, **kwargs: Any) -> httpx.Response:
        """Send the request, following redirects by hand so every hop's host is checked before it is called.

        The body is streamed: past `max_body_bytes` (decoded) the connection is dropped and ResponseTooLarge
        raised, so a huge answer never sits in memory."""
        target = self.check(url)
        # The run's trace goes with the call (with the SDK, the httpx instrumentation's span replaces it)
        kwargs["headers"] = {**tracing.carrier(), **(kwargs.get("headers") or {})}
        for _ in range(max_redirects + 1):
            request = client.build_request(method, target, **kwargs)
            response = client.send(request, stream=True, follow_redirects=False)
            try:
                if not response.is_redirect:
                    return _read(response, max_body_bytes)
            finally:
                response.close()
            location = response.headers.get("Location", "")
            target = self.check(urljoin(str(target), location))
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("json", "content", "data")}
        raise OutboundRefused(f"more than {max_redirects} redirects from {url!r}")


def _read(response: httpx.Response, limit: int | None) -> httpx.Response:
    """The streamed response, read whole, or ResponseTooLarge once more than `limit` bytes arrived."""
    if limit is None:
        response.read()
        return response
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit and "Content-Encoding" not in response.headers:
        raise ResponseTooLarge(f"the response body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"the response body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    # The body as decoded: drop the headers that described it on the wire.
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=b"".join(chunks), request=response.request,
                          extensions=response.extensions)
