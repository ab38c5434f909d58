"""The connector registry: connectors.yaml read, substituted and validated once at start-up."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from connectors import secrets
from connectors.factory_ref import check_factory_ref
from connectors.spec import ConnectorSpec, PythonSource, resolve_relative

_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<default>[^}]*))?\}")


class RegistrySettings(BaseSettings):
    """Where the connectors are declared, read as the gateway reads it: `python -m connectors check` needs only this,
    and the runtime's settings (flows.runtime), the gateway's after them, extend it."""

    # A setting is read from FLOWGATE_<its field name>, or from its validation_alias where the documented variable
    # is named otherwise (FLOWGATE_CONNECTORS, DATABASE_URL, FLOW_SERVER_PORT); never from the bare field name,
    # which a platform may set for itself (its own PORT, a stray API_KEYS). Code that builds settings by field
    # name goes through `of`.
    model_config = SettingsConfigDict(env_prefix="FLOWGATE_", extra="ignore", frozen=True)

    connectors_file: Path = Field(Path("connectors.yaml"), validation_alias="FLOWGATE_CONNECTORS",
                                  description="The YAML file that declares the connectors.")

    @classmethod
    def of(cls, **fields: Any) -> Self:
        """Settings from the environment, with `fields` (by field name) taking precedence."""
        aliases = {name: field.validation_alias if isinstance(field.validation_alias, str) else name
                   for name, field in cls.model_fields.items()}
        return cls(**{aliases.get(name, name): value for name, value in fields.items()})

    @classmethod
    def problems(cls, exc: ValidationError) -> str:
        """What `exc` (from building these settings) found wrong, each problem under its variable's name."""
        found = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            name = cls.env_name(field) if field in cls.model_fields else field
            found.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        return "; ".join(found)

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable the field `field` is read from."""
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else f"{cls.model_config.get('env_prefix', '')}{field.upper()}"


class RegistryError(ValueError):
    """connectors.yaml cannot be used; the message names the file, the connector and the field."""


def substitute_env(value: Any, where: str, environ: Mapping[str, str]) -> Any:
    """Replace `${VAR}` and `${VAR:default}` in every string inside `value`.

    Every value taken from the environment is a secret by construction: it is remembered (connectors.secrets)
    and scrubbed from everything a caller or a log reader sees."""
    if isinstance(value, dict):
        return {k: substitute_env(v, f"{where}.{k}", environ) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in environ:
            secrets.remember(environ[name])
            return environ[name]
        if default is None:
            raise RegistryError(f"{where}: environment variable {name} is not set and has no default")
        return default

    return _ENV_REF.sub(replace, value)


class ConnectorRegistry:
    """The connectors a gateway knows, by id."""

    def __init__(self, connectors: dict[str, ConnectorSpec], path: Path | None = None):
        self._connectors = connectors
        self.path = path

    @classmethod
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> ConnectorRegistry:
        """Read and validate `path`; raise RegistryError naming file, connector and field on any problem."""
        environ = os.environ if environ is None else environ
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RegistryError(f"{path}: file not found (set FLOWGATE_CONNECTORS)") from None
        except yaml.YAMLError as exc:
            raise RegistryError(f"{path}: not valid YAML: {exc}") from None
        if document is None:
            document = {"connectors": {}}
        if not isinstance(document, dict) or not isinstance(document.get("connectors", {}), dict):
            raise RegistryError(f"{path}: expected a mapping with a 'connectors' mapping at the top")
        unknown = set(document) - {"connectors"}
        if unknown:
            raise RegistryError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")

        connectors: dict[str, ConnectorSpec] = {}
        for connector_id, body in (document.get("connectors") or {}).items():
            where = f"{path}: connector '{connector_id}'"
            if not isinstance(body, dict):
                raise RegistryError(f"{where}: expected a mapping, got {type(body).__name__}")
            data = substitute_env(body, where, environ)
            data = resolve_relative({**data, "id": str(connector_id)}, path.parent.resolve())
            try:
                spec = ConnectorSpec.model_validate(data)
            except ValidationError as exc:
                raise RegistryError(f"{where}: " + "; ".join(_describe(e) for e in exc.errors())) from None
            if isinstance(spec.source, PythonSource):
                try:
                    check_factory_ref(spec.source.ref)  # without importing it when its source says (no dlt here)
                except (ImportError, AttributeError) as exc:
                    raise RegistryError(
                        f"{where}: field 'source.ref': cannot import {spec.source.ref}: {exc}") from None
            connectors[spec.id] = spec
        return cls(connectors, path)

    def get(self, connector_id: str) -> ConnectorSpec | None:
        """The connector with this id, or None."""
        return self._connectors.get(connector_id)

    def __iter__(self) -> Iterator[ConnectorSpec]:
        return iter(self._connectors.values())

    def __len__(self) -> int:
        return len(self._connectors)


def _describe(error: Mapping[str, Any]) -> str:
    # Drop pydantic's union-branch names (e.g. "source.sql_database.url" -> "source.url").
    loc = [str(p) for p in error["loc"] if p not in ("sql_database", "filesystem", "python", "rest_api")]
    return f"field '{'.'.join(loc) or '(root)'}': {error['msg']}"
