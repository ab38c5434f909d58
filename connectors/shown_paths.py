"""Paths as the API shows them: relative to the project (the folder of connectors.yaml, which relative paths in it
are relative to), or only a file's name outside it, so that no answer tells a caller where the gateway lives.

Connectors hold absolute paths once loaded (connectors.spec.resolve_relative) and a run's load summary names its
DuckDB file absolutely; the files stay where they are, only what a caller reads changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

_SQLITE = "sqlite:///"
# Fields that hold a local path (or a SQLite URL) in a connector's source or destination.
_PATH_FIELDS = ("url", "bucket_url", "path", "credentials")


def shown_path(path: str, project: Path) -> str:
    """An absolute path relative to `project` ("." for the project itself), or `…/<name>` outside it."""
    if path.startswith(_SQLITE):
        return _SQLITE + shown_path(path[len(_SQLITE):], project) if path[len(_SQLITE):].startswith("/") else path
    if path.startswith("file://"):
        return "file://" + shown_path(path[len("file://"):], project)
    candidate = Path(path)
    if "://" in path or not candidate.is_absolute():
        return path
    try:
        return candidate.relative_to(project).as_posix()
    except ValueError:
        return f"…/{candidate.name}"


def shown_spec(public: dict[str, Any], project: Path) -> dict[str, Any]:
    """A connector's public dict with the paths of its source and destination shown, and the project's own path
    taken out of any other text in it."""
    shown = dict(public)
    for part in ("source", "destination"):
        if isinstance(shown.get(part), dict):
            shown[part] = {key: shown_path(value, project) if key in _PATH_FIELDS and isinstance(value, str) else value
                           for key, value in shown[part].items()}
    return without_project(shown, project)


def without_project(value: Any, project: Path) -> Any:
    """`value` (JSON-like) with every mention of the project's absolute path made relative."""
    root = str(project)
    if isinstance(value, str):
        return value.replace(root + "/", "").replace(root, ".") if root in value and root != "/" else value
    if isinstance(value, dict):
        return {key: without_project(item, project) for key, item in value.items()}
    if isinstance(value, list):
        return [without_project(item, project) for item in value]
    return value
