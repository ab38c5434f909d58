"""Connector specifications: what a connector in connectors.yaml may say, validated by pydantic. Over 300 lines
because every source kind, with the bounds on what a trigger may override, is declared here side by side."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from connectors.failures import RetryPolicy
from connectors.recurrence import Recurrence, RecurrenceError, recurrence
from connectors.secrets import redact

if TYPE_CHECKING:  # dlt is imported where a run needs it, not with the specs
    from dlt.common.schema.typing import TSchemaContractDict

CONNECTOR_ID = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,99}$"
# What a trigger does while its target (a connector or a workflow) has a queued or running run.
OnConflict = Literal["queue", "join", "skip", "reject", "queue_one"]
# A glob that names nothing outside its folder: segments joined by '/', none of them '..', no ':' (no drive, no URL),
# no backslash or NUL, none starting with '~'. The field validator says which rule a refused glob broke.
_SEGMENT = r"(?:[^/\\\x00:.~][^/\\\x00:]*|\.|\.[^/\\\x00:.][^/\\\x00:]*|\.\.[^/\\\x00:]+)"
_RELATIVE_GLOB = rf"^{_SEGMENT}(?:/{_SEGMENT})*$"


_LOCAL_SCHEMES = ("file", "local")  # fsspec's names of the local filesystem


def local_folder(bucket_url: str) -> str | None:
    """The folder a bucket_url names on this machine, however it is written (`files`, `/srv/files`,
    `file:///srv/files`, `file:/srv/files`, `file://localhost/srv/files`, `local:///srv/files`), or None for a remote
    URL. ValueError for a file URL that names another host, a query or a fragment: readers disagree on what it means
    (fsspec reads `file://files/x` as the relative path files/x, dlt as the UNC path //files/x)."""
    parsed = urlsplit(bucket_url)
    if len(parsed.scheme) <= 1:  # a path (a drive letter is no scheme)
        return bucket_url
    if parsed.scheme.lower() not in _LOCAL_SCHEMES:
        return None
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"a file URL names no host ('{parsed.netloc}' here): write file:///absolute/path, or the "
                         "folder as a path")
    if parsed.query or parsed.fragment or not parsed.path:
        raise ValueError("a file URL must be file:///absolute/path, without '?' or '#'")
    return unquote(parsed.path)


class ParamsError(ValueError):
    """A trigger's params ask for something the connector does not allow; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IncrementalSpec(_Strict):
    """Load only rows whose cursor column moved past the last run's maximum (state kept by dlt)."""

    cursor: str = Field(min_length=1, description="Column that grows with every change, e.g. updated_at or id.")
    initial_value: Any = Field(None, description="Where the first run starts; all rows when omitted.")


class SqlDatabaseSource(_Strict):
    """Tables from any database SQLAlchemy can reach, read with dlt's sql_database source."""

    kind: Literal["sql_database"]
    url: str = Field(description="SQLAlchemy URL; a relative SQLite path is relative to connectors.yaml.")
    tables: list[str] | None = Field(None, min_length=1, description="Tables to load; all when omitted.")
    db_schema: str | None = Field(None, alias="schema", description="Database schema to read from.")
    backend: Literal["pyarrow", "sqlalchemy", "pandas", "connectorx"] = Field(
        "pyarrow", description="dlt's extraction backend; pyarrow is ~20x faster than dlt's default.")
    chunk_size: int = Field(50_000, ge=1, le=10_000_000, description="Rows per batch read from the database.")
    incremental: IncrementalSpec | None = Field(None, description="Incremental loading on a cursor column.")

    @property
    def overridable(self) -> tuple[str, ...]:
        """`tables`, and `initial_value` when loading incrementally."""
        return ("tables", "initial_value") if self.incremental else ("tables",)


class FilesystemSource(_Strict):
    """CSV or JSONL files from a folder (or any fsspec URL dlt understands)."""

    kind: Literal["filesystem"]
    bucket_url: str = Field(description="Folder or URL; a relative path is relative to connectors.yaml.")
    file_glob: str = Field("*.csv", pattern=_RELATIVE_GLOB, description=(
        "Which files under bucket_url to read: a relative glob, no '..' segment, no ':', '\\' or leading '~'."))
    format: Literal["csv", "jsonl"] | None = Field(None, description="File format; taken from file_glob when omitted.")
    table: str | None = Field(None, description="Destination table; the connector id when omitted.")
    incremental: bool = Field(False, description="Read only files modified since the last run.")

    overridable: ClassVar[tuple[str, ...]] = ("file_glob",)

    @field_validator("bucket_url")
    @classmethod
    def _local_folder_as_a_path(cls, bucket_url: str) -> str:
        # Every spelling of a local folder becomes its path, so the one symlink check (connectors.pipeline) sees it.
        return local_folder(bucket_url) or bucket_url

    @property
    def folder(self) -> Path | None:
        """The local folder read, resolved (symlinks followed); None when bucket_url is a remote URL."""
        path = local_folder(self.bucket_url)
        return Path(path).resolve() if path is not None else None

    @field_validator("file_glob", mode="before")
    @classmethod
    def _stays_inside_bucket(cls, glob: Any) -> Any:
        # A caller may override the glob: it must not name anything outside bucket_url (symlinks are
        # checked on each listed file, see connectors.pipeline).
        if not isinstance(glob, str):
            return glob  # the type check says what is wrong
        if not glob or "\x00" in glob or "\\" in glob or "://" in glob:
            raise ValueError("must be a relative glob with / separators")
        if glob.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", glob):
            raise ValueError("must be relative to bucket_url")
        if ".." in glob.split("/"):
            raise ValueError("must not climb out of bucket_url with '..'")
        return glob

    @property
    def file_format(self) -> str:
        """The format to read, explicit or from the glob's extension."""
        if self.format:
            return self.format
        return "jsonl" if self.file_glob.endswith((".jsonl", ".ndjson")) else "csv"


class ArgBounds(_Strict):
    """The values a trigger may give one overridable argument: a number's range, a text's or a list's length."""

    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = Field(None, ge=0)

    def problem(self, value: Any) -> str | None:
        """Why `value` is out of bounds, or None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                return f"must be at least {self.minimum:g}"
            if self.maximum is not None and value > self.maximum:
                return f"must be at most {self.maximum:g}"
        if isinstance(value, (str, list)) and self.max_length is not None and len(value) > self.max_length:
            return f"must have at most {self.max_length} {'characters' if isinstance(value, str) else 'items'}"
        return None


class PythonSource(_Strict):
    """A dlt source or resource factory named by a dotted path, called with `args`."""

    kind: Literal["python"]
    ref: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="`package.module:function`.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")
    bounds: dict[str, ArgBounds] | None = Field(None, description=(
        "What a trigger may set each argument to: `{delay_seconds: {minimum: 0, maximum: 60}}`, `{name: "
        "{max_length: 50}}`; checked before a run is stored."))

    @model_validator(mode="after")
    def _bounds_name_args(self) -> PythonSource:
        unknown = sorted(set(self.bounds or {}) - set(self.args))
        if unknown:
            raise ValueError(f"bounds for argument(s) not in args: {', '.join(unknown)}")
        for name, bound in (self.bounds or {}).items():
            problem = bound.problem(self.args[name])
            if problem:
                raise ValueError(f"args.{name}: the declared value {problem} (bounds.{name})")
        return self

    @property
    def overridable(self) -> tuple[str, ...]:
        """A trigger may override any argument the connector declares."""
        return tuple(self.args)


class RestApiSource(_Strict):
    """dlt's declarative REST API source: `config` is dlt's RESTAPIConfig (client, resource_defaults, resources)."""

    kind: Literal["rest_api"]
    config: dict[str, Any] = Field(description="dlt RESTAPIConfig: client (base_url, auth, paginator) and resources.")
    propagate_trace: bool = Field(False, description="Send the run's W3C `traceparent` (and `tracestate`) to the API "
                                                     "on every call: for APIs of your own, whose traces should "
                                                     "continue the run's; a third party would learn trace ids.")

    overridable: ClassVar[tuple[str, ...]] = ()

    @field_validator("config")
    @classmethod
    def _has_client_and_resources(cls, config: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(config.get("client"), dict) or not config["client"].get("base_url"):
            raise ValueError("needs client.base_url")
        if not config.get("resources"):
            raise ValueError("needs at least one resource")
        return config


ContractMode = Literal["evolve", "freeze", "discard_row", "discard_value"]  # dlt's TSchemaEvolutionMode
CONTRACT_MODES: tuple[str, ...] = ContractMode.__args__  # type: ignore[attr-defined]


class SchemaContractSpec(_Strict):
    """dlt's schema contract: what may happen when data brings a new table, a new column or a new data type.
    evolve: take it; freeze: fail the run; discard_row / discard_value: drop the row or the value. An entity
    left out is dlt's default (evolve)."""

    tables: ContractMode | None = Field(None, description="A new table.")
    columns: ContractMode | None = Field(None, description="A new column in an existing table.")
    data_type: ContractMode | None = Field(None, description="A value of another type (a variant column).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # dlt's shorthand: one mode for all three entities (as dlt's Schema.expand_schema_contract_settings reads it)
        if isinstance(value, str):
            if value not in CONTRACT_MODES:
                raise ValueError(f"'{value}' is not a contract mode: give one of {', '.join(CONTRACT_MODES)}, or a "
                                 "mapping of tables, columns and data_type to one")
            return {"tables": value, "columns": value, "data_type": value}
        if isinstance(value, dict) and not value:
            raise ValueError("give a mode for at least one of tables, columns, data_type")
        return value

    def to_dlt(self) -> TSchemaContractDict:
        """As dlt's TSchemaContractDict: the entities given."""
        contract: TSchemaContractDict = {}
        if self.tables is not None:
            contract["tables"] = self.tables
        if self.columns is not None:
            contract["columns"] = self.columns
        if self.data_type is not None:
            contract["data_type"] = self.data_type
        return contract


FileFormat = Literal["parquet", "jsonl", "csv", "insert_values"]  # among dlt's TLoaderFileFormat
SourceSpec = Annotated[SqlDatabaseSource | FilesystemSource | PythonSource | RestApiSource,
                       Field(discriminator="kind")]


class DestinationSpec(BaseModel):
    """Where data lands: a DuckDB file of the connector's own by default, or any dlt destination by name."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str = Field("duckdb", min_length=1, description="A dlt destination name: duckdb, postgres, filesystem, ...")
    path: str | None = Field(None, description="DuckDB only: the database file; var/duckdb/<connector>.duckdb when "
                                               "omitted.")
    credentials: str | dict[str, Any] | None = Field(None, description="Passed to the dlt destination.")
    file_format: FileFormat | None = Field(
        None, description="dlt's loader file format; the filesystem destination writes Parquet unless told otherwise.")

    @property
    def loader_file_format(self) -> FileFormat | None:
        """The file format to normalize into (None: dlt's choice for the destination)."""
        return self.file_format or ("parquet" if self.kind == "filesystem" else None)


class ScheduleSpec(_Strict):
    """When the gateway runs a connector or workflow on its own: exactly one of cron, interval (seconds) or rrule,
    and what to do with slots that passed while no gateway ran (connectors/recurrence.py computes the slots)."""

    cron: str | None = Field(None, description="Cron expression in `timezone`, e.g. '0 6 * * *' (6 fields: "
                                               "seconds first).")
    interval: float | None = Field(None, gt=0, le=366 * 86400,
                                   description="Seconds between runs, counted from the Unix epoch (no time zone).")
    rrule: str | None = Field(None, description="RFC 5545 recurrence rule in `timezone`, e.g. 'FREQ=WEEKLY;BYDAY=MO'.")
    timezone: str = Field("UTC", description="IANA time zone for cron and rrule.")
    active: bool = Field(True, description="False: declared but never fired (pausing is done through the API).")
    catch_up: Literal["latest", "all", "none"] = Field(
        "latest", description="Slots missed while no gateway ran: the newest runs once, late (latest); each runs, "
                              "oldest first, at most max_catch_up (all); none runs (none).")
    max_catch_up: int = Field(10, ge=1, le=1000, description="With catch_up: all, the most missed slots run.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {zone!r}") from None
        return zone

    @field_validator("cron", "rrule")
    @classmethod
    def _readable(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is not None:
            try:
                recurrence(cron=text) if info.field_name == "cron" else recurrence(rrule=text)
            except RecurrenceError as exc:
                raise ValueError(str(exc)) from None
        return text

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleSpec:
        given = [name for name in ("cron", "interval", "rrule") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of cron, interval or rrule (got {', '.join(given) or 'none'})")
        return self

    @property
    def recurrence(self) -> Recurrence:
        """The slots of this schedule."""
        return recurrence(self.cron, self.interval, self.rrule, self.timezone)

    def declared(self) -> dict[str, Any]:
        """The rule as written (what a scheduled run records as the schedule it came from)."""
        return self.model_dump(include={"cron", "interval", "rrule", "timezone", "catch_up"}, exclude_none=True)


class ConnectorSpec(_Strict):
    """One connector: a source, a destination and how to write."""

    id: str = Field(pattern=CONNECTOR_ID)
    description: str = ""
    source: SourceSpec
    destination: DestinationSpec = DestinationSpec()
    dataset: str = Field("raw", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    write_disposition: Literal["append", "replace", "merge"] = "append"
    primary_key: str | list[str] | None = Field(None, description="Required by merge unless the source declares one.")
    schedule: ScheduleSpec | None = Field(None, description="Run on a schedule, fired by the gateway.")
    callback_url: str | None = Field(None, min_length=1, max_length=2000, description=(
        "Where the runs no caller asked for (scheduled ones) POST their document when they end, as a trigger's "
        "callback_url does."))
    full_refresh: bool = Field(False, description="Drop the connector's tables and incremental state, load all again.")
    allow_full_refresh: bool = Field(False, description=(
        "Let a trigger's params ask for what replaces loaded data: `full_refresh` and an incremental "
        "`initial_value`. Off: either is a 422 naming the field."))
    schema_contract: SchemaContractSpec | None = Field(None, description=(
        "dlt's schema contract: a mode (evolve, freeze, discard_row, discard_value) or one per entity "
        "(tables, columns, data_type). dlt stores it with the schema: to lift it, set evolve."))
    retry: RetryPolicy | None = Field(None, description="Run a failed run again, by failure class (a trigger's "
                                                        "`retry` overrides it); none by default.")
    on_conflict: OnConflict = Field(
        "queue", description="A trigger while a run is queued or running: queue behind it, join it, skip, reject "
                             "(409), or keep at most one queued behind the running one (a trigger's overrides it).")

    @field_validator("primary_key")
    @classmethod
    def _non_empty_key(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None and not value:
            raise ValueError("must not be empty")
        return value

    @field_validator("dataset")
    @classmethod
    def _not_the_duckdb_catalog(cls, dataset: str, info: ValidationInfo) -> str:
        # DuckDB names a file's catalog after the file: a schema of the same name is ambiguous to its binder.
        destination = info.data.get("destination")
        if destination is not None and destination.kind == "duckdb" and destination.path \
                and Path(destination.path).stem.lower() == dataset.lower():
            raise ValueError(f"'{dataset}' is also the name of the DuckDB file {destination.path}, and DuckDB "
                             "cannot tell a schema from a file's catalog of the same name: rename one of them")
        return dataset

    @property
    def pipeline_name(self) -> str:
        """dlt pipeline name; one per connector, so two connectors never share dlt's working state."""
        return f"flowgate_{self.id}"

    @property
    def destructive_params(self) -> tuple[str, ...]:
        """The params that replace what the connector loaded: `full_refresh` drops its tables and incremental
        state, and an incremental sql_database source's `initial_value` then says where the new history starts."""
        incremental = isinstance(self.source, SqlDatabaseSource) and self.source.incremental is not None
        return ("full_refresh", "initial_value") if incremental else ("full_refresh",)

    @property
    def overridable(self) -> tuple[str, ...]:
        """What a trigger's params may set: the source's overridable fields, and `full_refresh`; the destructive
        ones only where the connector allows them (`allow_full_refresh`)."""
        if self.allow_full_refresh:
            return (*self.source.overridable, "full_refresh")
        return tuple(key for key in self.source.overridable if key not in self.destructive_params)

    def with_params(self, params: dict[str, Any]) -> ConnectorSpec:
        """This spec with a trigger's params applied; only the overridable fields may change."""
        params = dict(params)
        update: dict[str, Any] = {}
        if not self.allow_full_refresh:
            # any trigger key could otherwise replace a connector's history with almost nothing
            for key in (key for key in self.destructive_params if key in params):
                raise ParamsError(f"params.{key}", f"'{key}' would drop or rewind the data this connector loaded, "
                                                   "which it does not allow (allow_full_refresh: true in "
                                                   "connectors.yaml)")
        if "full_refresh" in params:
            update["full_refresh"] = params.pop("full_refresh")
            if not isinstance(update["full_refresh"], bool):
                raise ParamsError("params.full_refresh", "expected true or false")
        if not params:
            return self.model_copy(update=update) if update else self
        allowed = self.overridable
        for key in params:
            if key not in allowed:
                hint = f"overridable: {', '.join(allowed)}" if allowed else "this connector takes no params"
                raise ParamsError(f"params.{key}", f"'{key}' cannot be overridden ({hint})")
        if isinstance(self.source, SqlDatabaseSource) and self.source.tables and "tables" in params \
                and params["tables"] is None:
            params["tables"] = list(self.source.tables)  # null: the declared ones, never every table there is
        if isinstance(self.source, SqlDatabaseSource) and self.source.tables and isinstance(params.get("tables"), list):
            # a declared table list is the set a caller may choose from, not a default
            extra = [t for t in params["tables"] if t not in self.source.tables]
            if extra:
                raise ParamsError("params.tables", f"not among the connector's tables "
                                                   f"({', '.join(self.source.tables)}): {', '.join(map(str, extra))}")
        if isinstance(self.source, PythonSource):
            for key, value in params.items():
                _check_same_type(key, self.source.args[key], value)
                bound = (self.source.bounds or {}).get(key)
                problem = bound.problem(value) if bound is not None else None
                if problem:
                    raise ParamsError(f"params.{key}", f"{problem} (the connector's bounds.{key})")
            source_update = {"args": {**self.source.args, **params}}
        elif isinstance(self.source, SqlDatabaseSource) and self.source.incremental and "initial_value" in params:
            incremental = self.source.incremental.model_dump() | {"initial_value": params.pop("initial_value")}
            source_update = {**params, "incremental": incremental}
        else:
            source_update = params
        data = self.source.model_dump(by_alias=True) | source_update
        try:
            source = type(self.source).model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"] if p != "args")
            raise ParamsError(f"params.{loc}" if loc else "params", first["msg"]) from None
        return self.model_copy(update={**update, "source": source})

    def public_dict(self) -> dict[str, Any]:
        """The spec as callers may see it: secrets and URL passwords replaced by ***."""
        return redact(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def _check_same_type(key: str, declared: Any, value: Any) -> None:
    # A python source's args have no schema; the declared value's JSON type is the contract.
    if declared is None or value is None:
        return
    numbers = (int, float)
    same = (isinstance(declared, bool) == isinstance(value, bool)) and (
        isinstance(value, type(declared))
        or (isinstance(declared, numbers) and isinstance(value, numbers) and not isinstance(value, bool)))
    if not same:
        raise ParamsError(f"params.{key}", f"expected {type(declared).__name__} like the connector's "
                                           f"declared value, got {type(value).__name__}")


def resolve_relative(spec_data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make a source's relative SQLite path or folder relative to `base` (the YAML file's folder)."""
    source = dict(spec_data.get("source") or {})
    url = source.get("url")
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rel = url[len("sqlite:///"):]
        if rel and rel != ":memory:":
            source["url"] = f"sqlite:///{(base / rel).resolve()}"
    bucket = source.get("bucket_url")
    try:
        folder = local_folder(bucket) if isinstance(bucket, str) else None
    except ValueError:
        folder = None  # the field's validator says why
    if folder is not None and not Path(folder).is_absolute():
        source["bucket_url"] = str((base / folder).resolve())
    destination = spec_data.get("destination")
    if isinstance(destination, dict) and isinstance(destination.get("path"), str):
        path = Path(destination["path"])
        if not path.is_absolute():
            destination = {**destination, "path": str((base / path).resolve())}
        spec_data = {**spec_data, "destination": destination}
    return {**spec_data, "source": source} if source else spec_data
