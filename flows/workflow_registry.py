"""The workflow registry: every YAML file of the workflows folder, validated once at start-up."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from connectors.registry import RegistryError, substitute_env
from flows.nodes import NODE_TYPES
from flows.templates import has_template
from flows.workflow_spec import GraphError, NodeSpec, WorkflowSpec


class WorkflowError(ValueError):
    """A workflow definition cannot be used; `errors` name each field (`nodes[2].config.url`,
    `connections[0].target`)."""

    def __init__(self, where: str, errors: list[dict[str, str]]):
        super().__init__(f"{where}: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.where = where
        self.errors = errors


def node_problems(node: NodeSpec, connector_ids: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """What is wrong with a node before it runs: (field, message) pairs. Templated values are checked at run time."""
    node_type = NODE_TYPES.get(node.type)
    if node_type is None:
        return [("type", f"unknown node type '{node.type}' (known: {', '.join(sorted(NODE_TYPES))})")]
    fields = node_type.config.model_fields
    problems = [(f"config.{key}", "unknown field") for key in node.config if key not in fields]
    problems += [(f"config.{name}", "field required") for name, field in fields.items()
                 if field.is_required() and name not in node.config]
    if not problems and not has_template(node.config):
        try:
            node_type.config.model_validate(node.config)
        except ValidationError as exc:
            problems += [("config." + ".".join(str(p) for p in e["loc"]), e["msg"]) for e in exc.errors()]
    connector_id = node.config.get("connector_id")
    if (node.type == "connector" and connector_ids is not None and isinstance(connector_id, str)
            and not has_template(connector_id) and connector_id not in set(connector_ids)):
        problems.append(("config.connector_id", f"no connector '{connector_id}' in connectors.yaml"))
    return problems


def parse_workflow(data: Any, default_id: str, connector_ids: Iterable[str] | None = None,
                   where: str = "workflow") -> WorkflowSpec:
    """Validate a definition (a dict from YAML or a request body); raise WorkflowError naming every bad field."""
    if not isinstance(data, dict):
        raise WorkflowError(where, [{"field": "(root)", "message": f"expected a mapping, got {type(data).__name__}"}])
    try:
        spec = WorkflowSpec.model_validate({"id": default_id, **data})
    except ValidationError as exc:
        errors = []
        for error in exc.errors():
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, GraphError):
                errors += cause.errors
            else:
                errors.append({"field": ".".join(str(p) for p in error["loc"]) or "(root)", "message": error["msg"]})
        raise WorkflowError(where, errors) from None
    known = list(connector_ids) if connector_ids is not None else None
    errors = [{"field": f"nodes[{index}].{field}", "message": f"node '{node.id}': {message}"}
              for index, node in enumerate(spec.nodes) for field, message in node_problems(node, known)]
    if errors:
        raise WorkflowError(where, errors)
    return spec


def resolve_definition(definition: dict[str, Any], from_file: bool,
                       environ: Mapping[str, str] | None = None) -> WorkflowSpec:
    """A stored definition as a spec: a file's `${VAR}`s are filled in from the environment only now, where the
    run executes, so secrets live in no run record and no Prefect parameter. Inline definitions get no
    substitution: a caller must not be able to read the gateway's environment."""
    if from_file:
        try:
            definition = substitute_env(definition, f"workflow '{definition.get('id')}'",
                                        os.environ if environ is None else environ)
        except RegistryError as exc:
            raise WorkflowError("workflow", [{"field": "(env)", "message": str(exc)}]) from None
    return WorkflowSpec.model_validate(definition)


class WorkflowRegistry:
    """Workflows by id, read from `*.yaml` / `*.yml` files (the id defaults to the file name)."""

    def __init__(self, workflows: dict[str, WorkflowSpec], folder: Path | None = None,
                 definitions: dict[str, dict[str, Any]] | None = None):
        self._workflows = workflows
        self._definitions = definitions or {}
        self.folder = folder

    @classmethod
    def load(cls, folder: Path, connector_ids: Iterable[str] | None = None,
             environ: Mapping[str, str] | None = None) -> WorkflowRegistry:
        """Every workflow in `folder` (a missing folder is an empty registry); WorkflowError names file and field."""
        workflows: dict[str, WorkflowSpec] = {}
        definitions: dict[str, dict[str, Any]] = {}
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
        known = list(connector_ids) if connector_ids is not None else None
        for path in files:
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise WorkflowError(str(path), [{"field": "(file)", "message": f"not valid YAML: {exc}"}]) from None
            try:  # ${VAR} and ${VAR:default}, as in connectors.yaml: secrets stay out of the file
                resolved = substitute_env(data, str(path), os.environ if environ is None else environ)
            except RegistryError as exc:
                raise WorkflowError(str(path), [{"field": "(env)", "message": str(exc)}]) from None
            spec = parse_workflow(resolved, path.stem, known, where=str(path))
            if spec.id in workflows:
                raise WorkflowError(str(path), [{"field": "id", "message": f"workflow '{spec.id}' is defined twice"}])
            workflows[spec.id] = spec
            definitions[spec.id] = {**data, "id": spec.id}  # as written, ${VAR}s unresolved
        return cls(workflows, folder, definitions)

    def definition(self, workflow_id: str) -> dict[str, Any]:
        """The workflow as its file says it, `${VAR}` references unresolved: what a run record stores."""
        return self._definitions[workflow_id]

    def get(self, workflow_id: str) -> WorkflowSpec | None:
        return self._workflows.get(workflow_id)

    def __iter__(self) -> Iterator[WorkflowSpec]:
        return iter(self._workflows.values())

    def __len__(self) -> int:
        return len(self._workflows)
