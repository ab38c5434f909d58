"""A small paginated JSON API on loopback for the rest_api connector tests: cursor, offset and Link pagination,
a bearer token, and one 429 and one 500 along the way that dlt's retries must survive."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

TOKEN = "test-token-123"
ITEMS = [{"id": i, "name": f"item {i}"} for i in range(1, 26)]


class ApiServer:
    """Serves /items (cursor), /orders (offset), /events (Link header) and /changes (rows with id > `since`);
    records every request path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.changes = [dict(item, updated=item["id"]) for item in ITEMS]
        self.failures = {"/items?cursor=10": 429, "/orders?offset=10&limit=10": 500}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._json(401, {"error": "unauthorized"})
                status = server.failures.pop(self.path, None)
                if status:
                    return self._json(status, {"error": "try again"}, {"Retry-After": "0"})
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/items":
                    start = int(query.get("cursor", 0))
                    page = ITEMS[start:start + 10]
                    following = start + 10 if start + 10 < len(ITEMS) else None
                    return self._json(200, {"items": page, "next_cursor": str(following) if following else None})
                if url.path == "/orders":
                    offset, limit = int(query.get("offset", 0)), int(query.get("limit", 10))
                    return self._json(200, {"data": ITEMS[offset:offset + limit], "total": len(ITEMS)})
                if url.path == "/events":
                    page = int(query.get("page", 1))
                    headers = {"Link": f'<{server.url}/events?page={page + 1}>; rel="next"'} if page < 3 else {}
                    return self._json(200, ITEMS[(page - 1) * 10:page * 10], headers)
                if url.path == "/changes":
                    since = int(query.get("since", 0))
                    return self._json(200, [row for row in server.changes if row["updated"] > since])
                return self._json(404, {"error": "no such path"})

        return Handler
