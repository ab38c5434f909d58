"""Conditional GETs: a weak ETag over every JSON body, and 304 Not Modified when the caller already has it.

The dashboard polls the run list, a run, its logs and its nodes every couple of seconds; with `If-None-Match`
an unchanged answer costs a 304 with no body instead of the whole document.
"""
from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.wrappers import Response as BaseResponse


def init_app(app: Flask) -> None:
    """Tag every successful JSON answer to a GET or HEAD, and answer 304 when the tag matches."""

    @app.after_request
    def conditional(response: Response) -> BaseResponse:
        if (request.method not in ("GET", "HEAD") or response.status_code != 200
                or response.mimetype != "application/json" or response.direct_passthrough):
            return response
        response.add_etag(weak=True)
        # The body depends on the caller's key: no shared cache may keep it, and every use is revalidated.
        response.headers.setdefault("Cache-Control", "private, no-cache")
        response.vary.update(("Authorization", "X-API-Key"))
        return response.make_conditional(request.environ)
