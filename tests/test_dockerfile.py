"""The Dockerfile, checked without a Docker daemon: slim base, non-root, health check, gunicorn, real paths."""
from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_final_stage_is_slim_and_runs_as_a_non_root_user():
    steps = instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    assert final[0][1].startswith("python:3.11-slim")
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not any(op == "RUN" and re.search(r"apt-get install.*(gcc|build-essential)", arg) for op, arg in final)


def test_it_serves_with_gunicorn_and_checks_health():
    steps = dict(instructions())
    assert json.loads(steps["CMD"]) == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert "/health" in steps["HEALTHCHECK"]
    assert "/app/var" in steps["VOLUME"]
    assert "FLOWGATE_HOST=0.0.0.0" in steps["ENV"]


def test_every_copied_path_exists():
    for op, arg in instructions():
        if op == "COPY" and "--from" not in arg:
            sources = shlex.split(arg)[:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_every_repo_module_gunicorn_conf_imports_is_copied():
    """gunicorn.conf.py imports its worker class (app.gunicorn_worker): the image must hold what it imports."""
    copied = {source for op, arg in instructions() if op == "COPY" and "--from" not in arg
              for source in shlex.split(arg)[:-1]}
    tree = ast.parse((ROOT / "gunicorn.conf.py").read_text())
    modules = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    modules |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    local = {name for name in modules if (ROOT / f"{name}.py").exists() or (ROOT / name).is_dir()}
    assert "app" in local
    assert all(f"{name}.py" in copied or name in copied for name in local), (local, copied)
