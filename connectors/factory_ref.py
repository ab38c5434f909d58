"""Whether a python source's `package.module:function` names something, read from the module's source when it can.

The registry checks each python connector's `ref` when connectors.yaml is loaded, in every gateway worker. Importing
the module to check runs it, and a source module imports dlt (about 1.4 s of imports and tens of MB that a worker
never uses: its runs execute in processes forked from a forkserver that imported dlt once). So the module is found
without being run (importlib's find_spec) and its source is read: a name it binds (def, class, assignment, import,
for, with, except, match; anywhere in it, so a name bound only inside a function passes too, and fails at the run
instead) is there. A module whose source cannot say so for certain (no .py
source, a syntax error, `import *`, a module `__getattr__`, `global`, or globals()/vars()/exec/setattr/sys.modules
anywhere) is imported, as before.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

_DYNAMIC = ("globals", "vars", "exec", "setattr", "__getattr__", "__dict__")


def check_factory_ref(ref: str) -> None:
    """Raise ImportError or AttributeError, as importing `ref` would, when it names nothing."""
    module_name, _, attribute = ref.partition(":")
    if module_name in sys.modules:
        getattr(sys.modules[module_name], attribute)
        return
    names = _bound_names(module_name)
    if names is None:
        getattr(importlib.import_module(module_name), attribute)
    elif attribute not in names:
        raise AttributeError(f"module '{module_name}' has no attribute '{attribute}'")


def _bound_names(module_name: str) -> set[str] | None:
    """The names a module's source binds (anywhere in it); None when the source cannot tell (import it then)."""
    try:
        spec = importlib.util.find_spec(module_name)  # imports the parent packages, not the module
    except ValueError:
        return None
    if spec is None:
        raise ModuleNotFoundError(f"No module named '{module_name}'", name=module_name)
    if not spec.has_location or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):  # every name bound anywhere: a superset of the top level's, never less
        if isinstance(node, ast.Global) or (isinstance(node, ast.ImportFrom)
                                            and any(alias.name == "*" for alias in node.names)):
            return None
        if isinstance(node, ast.Name) and node.id in _DYNAMIC or isinstance(node, ast.Attribute) and (
                node.attr in _DYNAMIC or node.attr == "modules"):
            return None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return None if "__getattr__" in names else names
