"""GET /api/v1/whoami: the caller's key name and scopes (the dashboard asks what to offer; any valid key may)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, g

from app.auth import SCOPES
from app.schemas import WhoAmI

bp = Blueprint("whoami", __name__)


@bp.get("/api/v1/whoami")
def whoami() -> dict[str, Any]:
    """Without keys configured every caller may do everything, as `anonymous`."""
    key = g.get("api_key")
    if key is None:
        return WhoAmI(name="anonymous", scopes=list(SCOPES), authenticated=False).model_dump()
    scopes = SCOPES if "admin" in key.scopes else tuple(scope for scope in SCOPES if scope in key.scopes)
    return WhoAmI(name=key.name, scopes=list(scopes), authenticated=True).model_dump()
