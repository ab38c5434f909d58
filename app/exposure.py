"""Who can reach the gateway: the address gunicorn binds, and the rule that a gateway without API keys serves
loopback only unless FLOWGATE_ALLOW_UNAUTHENTICATED says otherwise (an open gateway is a decision, not an accident).

gunicorn.conf.py calls these at start-up (the requested address, then every address gunicorn really listens on,
after GUNICORN_CMD_ARGS and inherited sockets); they live here to be read and tested as code.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Any

from app.config import Settings


class Exposed(RuntimeError):
    """A gateway without keys would listen beyond loopback."""


def open_to_everyone(settings: Settings) -> bool:
    """Keys are set, or an unauthenticated gateway was asked for: any address may be served."""
    return bool(settings.api_keys or settings.api_keys_file) or settings.allow_unauthenticated


def bind_address(settings: Settings) -> tuple[str, str]:
    """(the address to bind, the one asked for): FLOWGATE_BIND, or FLOWGATE_HOST and FLOW_SERVER_PORT; without keys
    a non-loopback address is narrowed to 127.0.0.1 on the same port."""
    requested = settings.bind or f"{settings.host}:{settings.port}"
    if open_to_everyone(settings) or _loopback(requested):
        return requested, requested
    port = requested.rsplit(":", 1)[-1] if ":" in requested else str(settings.port)
    return f"127.0.0.1:{port}", requested


def guard(settings: Settings, addresses: list[Any], where: str) -> None:
    """Refuse (Exposed) to serve on anything but loopback without keys, naming the addresses."""
    if open_to_everyone(settings):
        return
    exposed = [address for address in addresses if not serves_loopback_only(address)]
    if exposed:
        raise Exposed(
            f"flowgate: no API keys configured (FLOWGATE_API_KEYS) and {where} "
            f"{', '.join(shown(a) for a in exposed)}, which is not loopback (a --bind or GUNICORN_CMD_ARGS "
            "overrides FLOWGATE_HOST): refusing to start. Set keys, bind 127.0.0.1, or set "
            "FLOWGATE_ALLOW_UNAUTHENTICATED=true to serve openly")


def serves_loopback_only(address: Any) -> bool:
    """Whether a bind address (as gunicorn parsed it) is reachable from this host only: a unix socket, a loopback
    address, or a name that resolves to loopback addresses only. An inherited fd (`fd://3`) is not known to be."""
    if isinstance(address, (str, bytes)):
        return True  # unix socket path
    if not isinstance(address, tuple):
        return False
    try:
        return ipaddress.ip_address(address[0].strip("[]").split("%")[0]).is_loopback
    except ValueError:
        try:
            infos = socket.getaddrinfo(address[0], None)
        except OSError:
            return False
        # an IP family's socket address starts with the address as text (typeshed allows AF_PACKET's int too)
        return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def shown(address: Any) -> str:
    """An address as a person writes it."""
    if isinstance(address, tuple):
        return f"[{address[0]}]:{address[1]}" if ":" in str(address[0]) else f"{address[0]}:{address[1]}"
    return str(address)


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or address.startswith("unix:")
