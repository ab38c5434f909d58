"""Reading request input once, at the edge: JSON bodies and query strings into validated models."""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, TypeVar, get_origin

from flask import g, request
from pydantic import BaseModel, ValidationError

from app.errors import BadRequest, UnsupportedMediaType, ValidationFailed, field_error
from app.schemas import IDEMPOTENCY_KEY_PATTERN
from connectors.nesting import NestedTooDeep, check_depth
from connectors.outbound import OutboundRefused

# How deep a body's field may nest. Far below what the walkers follow (connectors.nesting.MAX_DEPTH), so whatever is
# stored from a request can be shown, scrubbed and sent in a callback; no workflow definition needs more.
MAX_FIELD_DEPTH = 32

M = TypeVar("M", bound=BaseModel)


def json_object() -> dict[str, Any]:
    """The request body as a JSON object; an empty body is {}. A Content-Type other than JSON is a 415, malformed
    JSON or a non-object a 400."""
    require_json_content_type()
    raw = request.get_data(cache=True)  # werkzeug raises 413 past MAX_CONTENT_LENGTH
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 encoded JSON", code="malformed_json") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         code="malformed_json") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply", code="malformed_json") from None
    except ValueError as exc:  # e.g. an integer past Python's 4,300 digits
        raise BadRequest(f"request body is not acceptable JSON: {str(exc).split(';')[0]}",
                         code="malformed_json") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}", code="body_not_object")
    for field, value in data.items():
        check_field_depth(field, value)
    return data


def check_field_depth(field: str, value: Any, limit: int = MAX_FIELD_DEPTH) -> None:
    """A 422 naming `field` (and the key under it) when `value` nests more than `limit` levels."""
    try:
        check_depth(value, limit)
    except NestedTooDeep as exc:
        name = ".".join(str(part) for part in (field, *exc.path[:1]))
        raise ValidationFailed.of_field(name, str(exc)) from None


def require_json_content_type() -> None:
    """A 415 naming Content-Type unless the request says JSON (`application/json`, `application/*+json`) or sends
    no Content-Type and no body. A browser sends text/plain, a form type or none without asking the gateway first
    (no CORS preflight): taking those as JSON let any web page start runs on a gateway without keys."""
    mimetype = request.mimetype
    if mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json")):
        return
    if not mimetype and not request.get_data(cache=True).strip():
        return
    shown = request.headers.get("Content-Type", "")[:100] or "none"
    message = f"must be application/json (got {shown})"
    raise UnsupportedMediaType(f"Content-Type: {message}", errors=[field_error("Content-Type", message)])


def _not_json(name: str) -> Any:
    # Python's json module reads NaN and Infinity; JSON has neither, and no field could hold them.
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def validated(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """`data` as `model`, or a 422 whose `errors` name every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [field_error(prefix + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
        names = ", ".join(e["field"] for e in errors)
        raise ValidationFailed(f"invalid field(s): {names}", errors=errors) from None


def query(model: type[M]) -> M:
    """The query string as `model`: a list field from its parameter given any number of times; another parameter
    given more than once, or an unknown one, is a 422. Errors name the parameter as it is sent (`label`, not
    `label.1` for the second of several)."""
    args = request.args
    lists = {name for name, field in model.model_fields.items() if get_origin(field.annotation) is list}
    repeated = [key for key in args if key not in lists and len(args.getlist(key)) > 1]
    if repeated:
        raise ValidationFailed(f"parameter(s) given more than once: {', '.join(repeated)}",
                               errors=[field_error(key, "given more than once") for key in repeated])
    try:
        return model.model_validate({key: args.getlist(key) if key in lists else args[key] for key in args})
    except ValidationError as exc:
        errors = [field_error(str(e["loc"][0]) if e["loc"] else "", e["msg"]) for e in exc.errors()]
        raise ValidationFailed(f"invalid field(s): {', '.join(dict.fromkeys(e['field'] for e in errors))}",
                               errors=errors) from None



def checked_callback_url(url: str | None) -> str | None:
    """A trigger's `callback_url`, refused with a 422 unless callbacks are on and its host is allowed."""
    if url is None:
        return None
    from app import services

    svc = services()
    if not svc.settings.callback_secret:
        raise ValidationFailed.of_field("callback_url", "callbacks are off on this gateway "
                                                        "(FLOWGATE_CALLBACK_SECRET is not set)")
    try:
        svc.callbacks.policy.check(url)
    except OutboundRefused as exc:
        raise ValidationFailed.of_field("callback_url", f"{exc} (FLOWGATE_CALLBACK_ALLOWED_HOSTS)") from None
    return url


def preferred_wait(body_wait: float, limit: float) -> tuple[float, str | None]:
    """The seconds to wait: the body's `wait`, else RFC 7240's `Prefer: wait=N` capped at `limit`.

    Returns the wait and the Preference-Applied value to answer with (None when the header played no part).
    """
    if body_wait:
        return body_wait, None
    for preference in request.headers.get("Prefer", "").split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.lower() == "wait":
            try:
                asked = float(value.strip('" '))
            except ValueError:
                asked = math.nan
            # float() also reads "nan", "inf" and "-1"; a NaN survived min/max and made the wait endless.
            if not math.isfinite(asked) or asked < 0:
                raise ValidationFailed.of_field("Prefer",
                                                f"wait must be a finite number of seconds, 0 or more, got {value!r}")
            seconds = min(asked, limit)
            return seconds, f"wait={seconds:g}"
    return 0.0, None


def check_json_size(field: str, value: Any, limit: int) -> None:
    """A 422 naming `field` when `value` is larger than `limit` bytes as JSON."""
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > limit:
        raise ValidationFailed.of_field(field, f"is {size} bytes as JSON; the limit is {limit}")


def idempotency_key(body_key: str | None = None) -> str | None:
    """The body's `idempotency_key`, else the Idempotency-Key header (either is a 422 unless 1-255 printable ASCII),
    scoped to the caller: with API keys on, two callers using one key get two runs, and neither learns of the
    other's."""
    header = request.headers.get("Idempotency-Key")
    if header is not None and not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, header):
        raise ValidationFailed.of_field("Idempotency-Key", "must be 1 to 255 printable ASCII characters")
    key = body_key if body_key is not None else header
    caller = g.get("api_key")
    if key is None or caller is None:
        return key
    scoped = f"{caller.name}:{key}"
    return scoped if len(scoped) <= 255 else f"{caller.name}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def caller_name() -> str | None:
    """The name of the API key this request came with (None without keys): a run's `triggered_by`."""
    caller = g.get("api_key")
    return caller.name if caller is not None else None
