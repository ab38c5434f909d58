"""The run dashboard: static HTML, CSS and ES modules under /ui/, talking to the JSON API like any other caller.

The files hold no data, so they are served without a key (see app.auth.is_open); every API call the page makes
carries the key the user typed, in a header. Nothing is built at install time and nothing comes from a CDN.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory
from werkzeug.wrappers import Response as BaseResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"

# Self only: no inline script or style, no other origin, no framing; the page only talks to this gateway.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

bp = Blueprint("ui", __name__, url_prefix="/ui", static_folder=STATIC_DIR, static_url_path="")


@bp.get("", strict_slashes=True)
def to_index() -> BaseResponse:
    """`/ui` to `/ui/` by a relative Location (Werkzeug's own redirect names the request's Host)."""
    return redirect("/ui/", 308)


@bp.get("/")
def index() -> Response:
    """The single page; the hash (#/runs, #/runs/<id>, #/connectors, #/connectors/<id>, #/workflows, #/health)
    picks the view."""
    return send_from_directory(STATIC_DIR, "index.html")


@bp.after_request
def security_headers(response: Response) -> Response:
    """Lock the page down and make browsers revalidate files after an upgrade instead of running stale modules."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response
