"""What every refusal the gateway answers looks like: application/problem+json (RFC 9457) with a stable code."""
from __future__ import annotations


def assert_problem(response, status: int, code: str) -> dict:
    """`response` (a Flask test client's) is an application/problem+json `status` with `code`, a title, a detail
    and a type naming the code, and no traceback; its body."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.json
    assert body["status"] == status and body["code"] == code and body["title"] and body["detail"]
    assert body["type"].endswith(code)
    assert "Traceback" not in response.get_data(as_text=True)
    return body
