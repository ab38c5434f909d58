"""`python -m connectors check`: lists valid connectors, fails naming file, connector and field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connectors", "check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_check_lists_every_connector_of_a_valid_file():
    done = run_check("connectors.yaml")
    assert done.returncode == 0, done.stderr
    assert "demo_orders: sql_database sqlite:///" in done.stdout and "-> duckdb dataset shop_raw" in done.stdout
    assert "ok: 3 connector(s)" in done.stdout


def test_check_fails_naming_the_problem_and_redacts_secrets(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("connectors:\n  c:\n    source: {kind: sql_database, url: 'postgresql://u:pw@h/db'}\n"
                   "    write_disposition: upsert\n")
    done = run_check(str(bad))
    assert done.returncode == 1
    assert f"{bad}: connector 'c': field 'write_disposition'" in done.stderr
    good = tmp_path / "good.yaml"
    good.write_text("connectors:\n  c:\n    source: {kind: sql_database, url: 'postgresql://u:pw@h/db'}\n")
    done = run_check(str(good))
    assert done.returncode == 0 and "pw" not in done.stdout and "postgresql://u:***@h/db" in done.stdout


def test_check_without_a_file_reads_the_one_flowgate_connectors_names(tmp_path: Path, monkeypatch, capsys):
    from connectors.__main__ import main

    named = tmp_path / "named.yaml"
    named.write_text("connectors:\n  c:\n    source: {kind: sql_database, url: 'sqlite:///x.db'}\n")
    monkeypatch.setenv("FLOWGATE_CONNECTORS", str(named))
    assert main(["check"]) == 0
    assert f"ok: 1 connector(s) in {named}" in capsys.readouterr().out
