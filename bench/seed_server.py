"""A faithful copy of the original flow server (shared/seeds/000_*): one thread, /trigger runs the pipeline inline.

Kept only as the benchmark's baseline. `python -m bench.seed_server PORT CONNECTORS_YAML VAR_DIR`
"""
from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from connectors.pipeline import Workspace, run_connector
from connectors.registry import ConnectorRegistry


def make_handler(registry: ConnectorRegistry, workspace: Workspace) -> type[BaseHTTPRequestHandler]:
    def run_connector_pipeline(connector_id: str) -> dict:
        return run_connector(registry.get(connector_id), workspace).to_dict()

    class FlowHandler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: dict) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "healthy"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/trigger":
                self._send(404, {"error": "not found"})
                return
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            try:
                result = run_connector_pipeline(data.get("connector_id"))
                self._send(200, {"status": "success", "result": result})
            except Exception as exc:
                self._send(500, {"status": "error", "error": str(exc)})

        def log_message(self, format: str, *args: object) -> None:
            pass

    return FlowHandler


if __name__ == "__main__":
    port, connectors_file, var_dir = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    workspace = Workspace(var_dir / "dlt", var_dir / "duckdb")
    server = HTTPServer(("127.0.0.1", port), make_handler(ConnectorRegistry.load(connectors_file), workspace))
    server.serve_forever()
