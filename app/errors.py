"""One error hierarchy, one handler: every failure leaves the app as application/problem+json (RFC 9457)."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_TYPE = "https://flowgate.dev/problems/{code}"
_HTTP_CODES = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 406: "not_acceptable",
    413: "body_too_large", 415: "unsupported_media_type", 429: "too_many_requests",
}


class Problem(Exception):
    """A failure a caller should see: an HTTP status, a stable `code`, a human `detail`."""

    status = 500
    code = "internal_error"
    title = "Internal Server Error"

    def __init__(self, detail: str, *, code: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.code
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra


class BadRequest(Problem):
    status, code, title = 400, "bad_request", "Bad Request"


class NotFound(Problem):
    status, code, title = 404, "not_found", "Not Found"


class Conflict(Problem):
    status, code, title = 409, "conflict", "Conflict"


def field_error(field: str, message: str) -> dict[str, str]:
    """One entry of a problem document's `errors`."""
    return {"field": field or "(body)", "message": message}


class ValidationFailed(Problem):
    """Well-formed JSON that breaks the contract; `errors` names each field."""

    status, code, title = 422, "validation_failed", "Unprocessable Content"

    @classmethod
    def of_field(cls, field: str, message: str) -> ValidationFailed:
        """A 422 about one field."""
        return cls(f"{field}: {message}", errors=[field_error(field, message)])


class UnsupportedMediaType(Problem):
    status, code, title = 415, "unsupported_media_type", "Unsupported Media Type"


class TooManyRequests(Problem):
    status, code, title = 429, "too_many_requests", "Too Many Requests"


class Unavailable(Problem):
    status, code, title = 503, "unavailable", "Service Unavailable"


class GatewayTimeout(Problem):
    status, code, title = 504, "gateway_timeout", "Gateway Timeout"


def problem_response(status: int, code: str, title: str, detail: str, *,
                     headers: dict[str, str] | None = None, **members: Any) -> Response:
    """Build an application/problem+json response."""
    body = {"type": PROBLEM_TYPE.format(code=code), "title": title, "status": status, "detail": detail,
            "code": code, "instance": request.path}
    body.update({k: v for k, v in members.items() if v is not None})
    response = jsonify(body)
    response.status_code = status
    response.mimetype = "application/problem+json"
    response.headers.update(headers or {})
    return response


def _from_problem(exc: Problem) -> Response:
    return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers,
                            errors=exc.errors, **exc.extra)


def _from_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers = {k: v for k, v in exc.get_headers() if k.lower() == "allow"}
    detail = exc.description or exc.name
    if status == 413:
        detail = f"request body exceeds the limit of {request.max_content_length} bytes"
    elif status == 404:
        detail = f"no resource at {request.path}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.path}"
    return problem_response(status, _HTTP_CODES.get(status, f"http_{status}"), exc.name, detail, headers=headers)


def _from_unexpected(exc: Exception) -> Response:
    # Log everything for the operator; tell the caller nothing about the internals.
    log.exception("unhandled error on %s %s", request.method, request.path)
    return problem_response(500, "internal_error", "Internal Server Error",
                            "the gateway failed to handle this request; the error was logged")


def init_app(app: Flask) -> None:
    """Route every error through the problem+json handlers."""
    app.register_error_handler(Problem, _from_problem)
    app.register_error_handler(HTTPException, _from_http)
    app.register_error_handler(Exception, _from_unexpected)
