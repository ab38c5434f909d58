"""schemathesis, every phase (examples, coverage, fuzzing, stateful) and every check, against a real gunicorn with the
shipped connectors.yaml, with API keys off and on.

It fails on any 5xx but a documented 503, any status, content type, header or body the document does not describe,
any schema-violating request accepted (a boolean or a string taken as a number included), any schema-valid request
refused where the document says exactly what is accepted, and, with keys on, any request accepted without one.
tests/support/schemathesis.toml holds the settings and says why each relaxation is there. `make test` runs
FLOWGATE_FUZZ_EXAMPLES (default 5) examples per operation; `make fuzz` runs many more. Generation is deterministic
(`--generation-deterministic`: the same cases every run), so a failure reproduces with the same command.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gunicorn_server import ROOT, GunicornServer

pytestmark = pytest.mark.long(seconds=60)  # started first in the parallel run (conftest.py)

KEY = "fuzz-admin-key-0123456789"
EXAMPLES = int(os.environ.get("FLOWGATE_FUZZ_EXAMPLES", "5"))
CONFIG = Path(__file__).parent / "support" / "schemathesis.toml"
PHASES = "examples,coverage,fuzzing,stateful"


def schemathesis_command(url: str, api_key: str | None) -> list[str]:
    """The CLI run, as a user would type it (`schemathesis --config-file tests/support/schemathesis.toml run ...`).

    Every built-in check is on by default; `--checks all` is not passed because on the command line it would
    override the per-operation settings of the config file. One worker: hypothesis describes its strategies with
    `ast.parse`, which CPython before 3.11.8 cannot run in two threads at once (gh-106905: "AST constructor
    recursion depth mismatch", seen here in four runs in a row with two workers).
    """
    command = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "--phases", PHASES,
               "--max-examples", str(EXAMPLES), "--workers", "1", "--generation-deterministic",
               "--generation-with-security-parameters", "false", "--request-timeout", "30", "--no-color"]
    if api_key:
        # Every generated request carries the key; the ignored_auth check also sends each without it.
        command += ["--header", f"X-API-Key: {api_key}"]
    return command


@pytest.mark.parametrize("keys", [False, True], ids=["keys-off", "keys-on"])
def test_every_schemathesis_phase_finds_nothing_on_a_real_gunicorn(tmp_path, keys):
    env = {"FLOWGATE_CONNECTORS": str(ROOT / "connectors.yaml"), "FLOWGATE_WORKFLOWS": str(ROOT / "workflows"),
           # The document carries these limits, so generated waits stay short and the run stays bounded.
           "FLOWGATE_MAX_WAIT_SECONDS": "2", "GUNICORN_LOG_LEVEL": "warning",
           # schemathesis sends wrong keys to every operation: more than the default limit allows one address,
           # after which they are 429s the document does not list for them (tests/test_auth.py checks that limit)
           "FLOWGATE_AUTH_FAILURE_LIMIT": "100000/minute"}
    if keys:
        env["FLOWGATE_API_KEYS"] = f"fuzz:{KEY}:admin"
    server = GunicornServer(tmp_path, workers=3, **env)
    server.ready_headers = {"X-API-Key": KEY} if keys else {}
    server.start()
    try:
        result = subprocess.run(schemathesis_command(server.url, KEY if keys else None), cwd=tmp_path,
                                capture_output=True, text=True, timeout=900)
    finally:
        server.kill()
    output = result.stdout + result.stderr
    errors = [line for line in server.log().splitlines() if '"level": "ERROR"' in line]
    assert result.returncode == 0, output[-12000:] + "\n--- gateway errors ---\n" + "\n".join(errors[:5])[:4000]
    assert "Stateful" in output and "Coverage" in output and "Fuzzing" in output
    assert not errors, "\n".join(errors[:5])[:4000]
