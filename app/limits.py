"""Rate limits per caller (the API key's name, else the client address), with Flask-Limiter.

FLOWGATE_RATE_LIMIT is one budget per caller over the whole API ("600/minute", "20/second;600/minute");
/health is exempt. With FLOWGATE_RATE_LIMIT_STORAGE (e.g. redis://127.0.0.1:6379) every gunicorn worker
and replica counts against one budget; without it each process counts its own (memory://).
"""
from __future__ import annotations

from flask import Flask, g, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from app.auth import is_open


def caller() -> str:
    """Who a request counts against: its API key's name, or its address when keys are off."""
    key = g.get("api_key")
    return f"key:{key.name}" if key is not None else f"addr:{get_remote_address()}"


def init_app(app: Flask, rate_limit: str | None, storage_uri: str | None) -> Limiter | None:
    """Limit every request but /health and the dashboard's files to `rate_limit` per caller; None when no limit is set.

    Register after auth, so the caller's key is known when the limit is checked.
    """
    if not rate_limit:
        return None
    return Limiter(caller, app=app, application_limits=[rate_limit],
                   application_limits_exempt_when=lambda: is_open(request.path),
                   storage_uri=storage_uri or "memory://", headers_enabled=True, strategy="moving-window",
                   key_prefix="flowgate")
