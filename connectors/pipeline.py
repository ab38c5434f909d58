"""run_connector: one connector run as a dlt pipeline, the same code on every execution path.

Over 300 lines because the steps, their recovery, the summary and the destinations a spec names are one pipeline's
life, read top to bottom; what flowgate knows of dlt's internals is in dlt_recovery.py, the report in report.py."""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from connectors import tracing
from connectors.failures import TERMINAL, TRANSIENT, classify
from connectors.outbound import OutboundPolicy
from connectors.secrets import public_error, redact_text
from connectors.spec import ConnectorSpec, FilesystemSource, PythonSource, RestApiSource, SqlDatabaseSource

log = logging.getLogger(__name__)


class ConnectorRunError(RuntimeError):
    """A connector run failed in `step`; `failure_class` (connectors.failures) says whether running it again can
    help, `terminal` that it cannot."""

    def __init__(self, connector_id: str, step: str, message: str, terminal: bool = False,
                 failure_class: str | None = None):
        message = public_error(redact_text(message))  # read by callers: no secrets, no server folders
        super().__init__(f"connector '{connector_id}' failed in {step}: {message}")
        self.connector_id = connector_id
        self.step = step
        self.message = message
        self.failure_class = failure_class or (TERMINAL if terminal else TRANSIENT)
        self.terminal = self.failure_class == TERMINAL

    @classmethod
    def of(cls, connector_id: str, step: str, exc: BaseException) -> ConnectorRunError:
        """The error for an exception a step raised, classified by its cause (connectors.failures.classify)."""
        cause = getattr(exc, "exception", None) or exc  # dlt wraps failures in PipelineStepFailed
        failure = classify(exc)
        return cls(connector_id, getattr(exc, "step", step), f"{type(cause).__name__}: {cause} ({failure.reason})",
                   failure_class=failure.failure_class)


class RunCancelled(RuntimeError):
    """The run was cancelled; it stopped at the checkpoint after `step` (or, stopped by force, during it)."""

    def __init__(self, step: str, message: str | None = None):
        super().__init__(message or f"cancelled after {step}")
        self.step = step


@dataclass(frozen=True)
class Workspace:
    """Where pipelines keep their working state and, by default, their DuckDB files; and the hosts their sources
    may call (rest_api: FLOWGATE_HTTP_ALLOWED_HOSTS, as for http nodes; none unless given)."""

    pipelines_dir: Path
    duckdb_dir: Path
    outbound: OutboundPolicy = field(default_factory=OutboundPolicy)


@dataclass(frozen=True)
class LoadSummary:
    """What a finished connector run did: rows per table (of every package it loaded, a killed run's too), load
    ids, where the data went, how long it took; the tables and columns it added or changed, each incremental
    table's cursor window, and a merge table's inserted and updated rows (DuckDB only)."""

    connector_id: str
    pipeline_name: str
    destination: str
    dataset: str
    location: str | None
    rows: dict[str, int] = field(default_factory=dict)
    load_ids: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0
    schema_changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    incremental: dict[str, dict[str, Any]] = field(default_factory=dict)
    merge: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def of_steps(cls, steps: list[LoadSummary], duration_seconds: float) -> LoadSummary:
        """One run's summary from the summaries of its steps, each run in a process of its own (the Prefect
        flow's): rows, loads and merge counts added up; schema changes and incremental windows as the last step
        saw them (it took up the earlier steps' notes), each window with the run's rows."""
        rows: dict[str, int] = {}
        merge: dict[str, dict[str, int]] = {}
        for step in steps:
            for table, count in step.rows.items():
                rows[table] = rows.get(table, 0) + count
            for table, counts in step.merge.items():
                merge[table] = {key: merge.get(table, {}).get(key, 0) + value for key, value in counts.items()}
        last = steps[-1]
        return replace(last, rows=rows, load_ids=[load_id for step in steps for load_id in step.load_ids],
                       duration_seconds=round(duration_seconds, 3), merge=merge,
                       incremental={table: {**window, "rows": rows.get(table, 0)}
                                    for table, window in last.incremental.items()})


def duckdb_path(spec: ConnectorSpec, workspace: Workspace) -> Path | None:
    """The DuckDB file a connector writes, or None when its destination is not DuckDB."""
    if spec.destination.kind != "duckdb":
        return None
    if spec.destination.path:
        return Path(spec.destination.path).resolve()
    # DuckDB names the catalog after the file: a dataset (schema) of the same name would be ambiguous to its
    # binder, so such a connector's file gets a suffix (no such file ever loaded: every run of one failed).
    name = f"{spec.id}_data" if spec.id.lower() == spec.dataset.lower() else spec.id
    return workspace.duckdb_dir / f"{name}.duckdb"


def concurrency_key(spec: ConnectorSpec, workspace: Workspace) -> str:
    """Runs with the same key never execute at once: one dlt pipeline, or one DuckDB file, at a time."""
    path = duckdb_path(spec, workspace)
    return f"duckdb:{path}" if path else f"connector:{spec.id}"


class ConnectorPipeline:
    """One connector run as dlt steps, so a caller can run them one by one (the Prefect flow makes each a task)."""

    steps = ("recover", "extract", "normalize", "load")

    def __init__(self, spec: ConnectorSpec, workspace: Workspace):
        _configure_dlt()
        import dlt

        from connectors.report import RunReport

        self.spec = spec
        self.workspace = workspace
        self._started = time.monotonic()
        self._pipeline = dlt.pipeline(
            pipeline_name=spec.pipeline_name,
            pipelines_dir=str(workspace.pipelines_dir),
            destination=_destination(spec, workspace),
            dataset_name=spec.dataset,
        )
        self.report = RunReport(Path(self._pipeline.working_dir), count_merges=duckdb_path(spec, workspace) is not None)

    def run_step(self, step: str) -> None:
        """Run one of `steps` in a span of its own (normalize and load say the rows per table); a failure becomes
        a ConnectorRunError naming the step, the cause and its class."""
        with tracing.tracer().start_as_current_span(step, attributes={"flowgate.connector_id": self.spec.id}) as span:
            try:
                getattr(self, f"_{step}")()
            except ConnectorRunError:
                raise
            except Exception as exc:  # dlt wraps failures in PipelineStepFailed; keep the step, the cause, its class
                from connectors.schema_contract import contract_violation

                refused = contract_violation(exc)
                if refused is not None:
                    raise self._refused(getattr(exc, "step", step), refused) from exc
                raise ConnectorRunError.of(self.spec.id, step, exc) from exc
            if step in ("normalize", "load") and span.is_recording():
                span.set_attributes({f"flowgate.rows.{table}": count for table, count in self.report.rows.items()})
                if step == "load":
                    span.set_attribute("flowgate.load_ids", list(self.report.load_ids))

    def _recover(self) -> None:
        from connectors.dlt_recovery import complete_interrupted_commits, stale_packages

        complete_interrupted_commits(Path(self._pipeline.working_dir))  # a commit of dlt's cut short by a kill
        # As dlt's own run() does: take the state (incremental cursors, schemas) from the destination when it is
        # newer than this working folder's (another folder loaded since: another host, the other execution path).
        # Always asked: which folder loaded last cannot be told from here, nor by host clocks.
        if self._pipeline.config.restore_from_destination:
            if stale_packages(self._pipeline):
                log.warning("connector %s: dropping the load packages a killed run left in this folder: a run on "
                            "another folder has loaded since, from the same state", self.spec.id)
                self._pipeline.drop_pending_packages()
            self._pipeline.sync_destination()
        # What the destination held: a killed run's changes count here. Its own open of the file, after the state's:
        # one open for both would hold the file through sync's work in between (measured: recover's locked time
        # up 10-45%, though one open less; docs/benchmarks.md, issue 31).
        self.report.schema_before(self._pipeline)
        # Finish the load packages a run killed mid-way left behind (a job of theirs that had committed in DuckDB
        # finds its mark there and does not load again: connectors/dlt_recovery.py). A normalized one first: it is
        # the older, and a refused extracted one is aborted only with none left (dlt's abort would take it too).
        if self._pipeline.has_pending_data:
            if self._pipeline.list_normalized_load_packages():
                self._load()
            if self._pipeline.list_extracted_load_packages():
                self._normalize()
                self._load()
        self.report.package_rows.keep_only(self._pending_load_ids())

    def _extract(self) -> None:
        if self.spec.full_refresh:  # in the run's log: the run's params say who asked, this what it did
            log.warning("connector %s: full refresh: dropping its tables and incremental state, loading everything "
                        "again", self.spec.id)
        self.report.before_extract(self._pipeline, refresh=self.spec.full_refresh)
        info = self._pipeline.extract(
            build_source(self.spec, self.workspace.outbound), write_disposition=self.spec.write_disposition,
            primary_key=self.spec.primary_key, loader_file_format=self.spec.destination.loader_file_format,
            schema_contract=self.spec.schema_contract.to_dlt() if self.spec.schema_contract else None,
            refresh="drop_sources" if self.spec.full_refresh else None)
        self.report.extracted(self._pipeline, info)

    def _normalize(self) -> None:
        # in-process: forking inside a threaded gunicorn worker is unsafe
        self.report.normalized(self._pipeline.normalize(workers=1))

    def _load(self) -> None:
        with self._one_connection():
            before = self.report.before_load(self._pipeline)
            self.report.loaded(self._pipeline, self._pipeline.load(), before)

    def _one_connection(self) -> Any:
        """Into DuckDB, a dlt client held open for the load: the clients dlt makes meanwhile (the package's, each
        job's, the completion's; the merge counts') share its database instance (dlt's connection pool, through
        the run's one credentials: dlt_recovery.flowgate_duckdb.for_run) instead of each opening the file anew
        (~20 ms of CPU an open, most of it DuckDB starting an instance). The file is then locked from the load's
        start to its end in one hold instead of three, for less time in all (measured: docs/benchmarks.md, issue
        31); it stays free for other processes between the steps."""
        if duckdb_path(self.spec, self.workspace) is None:
            return contextlib.nullcontext()
        return self._pipeline.sql_client()

    def _pending_load_ids(self) -> list[str]:
        return [*self._pipeline.list_extracted_load_packages(), *self._pipeline.list_normalized_load_packages()]

    def _refused(self, step: str, refused: Any) -> ConnectorRunError:
        """The violation dlt raised, after aborting the refused package (normalize leaves it pending)."""
        from connectors.dlt_recovery import abort_refused_packages
        from connectors.schema_contract import SchemaContractViolation

        if step == "normalize":
            abort_refused_packages(self._pipeline)
            self.report.package_rows.keep_only(self._pending_load_ids())
        return SchemaContractViolation(self.spec.id, step, refused.table_name, refused.column_name,
                                       refused.schema_entity, refused.contract_mode)

    def summary(self) -> LoadSummary:
        """What the steps run so far did."""
        path = duckdb_path(self.spec, self.workspace)
        return LoadSummary(
            connector_id=self.spec.id,
            pipeline_name=self.spec.pipeline_name,
            destination=self.spec.destination.kind,
            dataset=self.spec.dataset,
            location=str(path) if path else None,
            rows=dict(self.report.rows),
            load_ids=list(self.report.load_ids),
            duration_seconds=round(time.monotonic() - self._started, 3),
            schema_changes=self.report.schema_changes(self._pipeline),
            incremental=self.report.incremental_windows(),
            merge=dict(self.report.merge),
        )


def run_connector(
    spec: ConnectorSpec,
    workspace: Workspace,
    should_stop: Callable[[], bool] = lambda: False,
    on_step: Callable[[str], None] = lambda step: None,
    steps: Sequence[str] = ConnectorPipeline.steps,
) -> LoadSummary:
    """Recover, extract, normalize and load one connector; check `should_stop` between the steps. `on_step` hears
    each step begin. `steps`: only these, for a caller that runs each step apart (dlt keeps what a step made in
    the pipeline's working folder, where the next step's process finds it); the summary is of these."""
    pipeline = ConnectorPipeline(spec, workspace)
    for step in steps:
        on_step(step)
        pipeline.run_step(step)
        if step in ("extract", "normalize") and should_stop():
            raise RunCancelled(step)
    return pipeline.summary()


@functools.cache
def _configure_dlt() -> None:
    # No network here or in most data centres' job runners: dlt must not try to send telemetry.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")


def _destination(spec: ConnectorSpec, workspace: Workspace) -> Any:
    from dlt.common.destination import Destination

    path = duckdb_path(spec, workspace)
    if path is not None:
        from connectors.dlt_recovery import flowgate_duckdb

        path.parent.mkdir(parents=True, exist_ok=True)
        # dlt's DuckDB with load jobs that land rows once; its name (config section, logs) stays dlt's "duckdb"
        return flowgate_duckdb.for_run(str(path), spec.pipeline_name)
    options = spec.destination.model_dump(exclude={"kind", "path", "file_format"}, exclude_none=True)
    return Destination.from_reference(spec.destination.kind, **options)


def build_source(spec: ConnectorSpec, outbound: OutboundPolicy) -> Any:
    """The dlt source (or resource) a connector reads from, built from its spec; a rest_api source calls only the
    hosts `outbound` allows, with its credentials only to its base_url's origin (connectors/rest_session.py)."""
    import dlt

    source = spec.source
    check_source_exists(spec)
    if isinstance(source, SqlDatabaseSource):
        from dlt.sources.sql_database import sql_database

        from connectors.cursor_loader import CursorArrowLoader

        database = sql_database(
            credentials=source.url,
            schema=source.db_schema,
            table_names=source.tables,
            backend=source.backend,
            chunk_size=source.chunk_size,
            # pyarrow: the same Arrow tables as dlt's loader, fetched from the DBAPI cursor (2-3x faster here)
            table_loader_class=CursorArrowLoader if source.backend == "pyarrow" else None,
        )
        if source.incremental:
            for resource in database.resources.values():
                resource.apply_hints(incremental=dlt.sources.incremental(
                    source.incremental.cursor, initial_value=source.incremental.initial_value))
        return database
    if isinstance(source, FilesystemSource):
        from dlt.sources.filesystem import filesystem, read_csv_duckdb, read_jsonl

        files = filesystem(bucket_url=source.bucket_url, file_glob=source.file_glob)
        if source.folder is not None:
            files.add_filter(functools.partial(_inside_folder, source.folder))
        if source.incremental:
            files.apply_hints(incremental=dlt.sources.incremental("modification_date"))
        reader = read_csv_duckdb(use_pyarrow=True) if source.file_format == "csv" else read_jsonl()
        return (files | reader).with_name(source.table or spec.id)
    if isinstance(source, PythonSource):
        return load_factory(source.ref, spec.id)(**source.args)
    if isinstance(source, RestApiSource):
        from dlt.sources.rest_api import RESTAPIConfig, rest_api_source

        from connectors.rest_session import guarded_session

        config = source.config
        if source.propagate_trace:  # the run's traceparent on every call to the API (its headers win)
            client = config["client"]
            config = {**config, "client": {**client, "headers": {**tracing.carrier(), **(client.get("headers") or {})}}}
        config = {**config, "client": {**config["client"], "session": guarded_session(config, outbound)}}
        # The connector's `config` as written in YAML: rest_api_source validates it against RESTAPIConfig itself
        return rest_api_source(cast(RESTAPIConfig, config), name=spec.id)
    raise ConnectorRunError(spec.id, "extract", f"unsupported source kind {source.kind!r}", terminal=True)


def check_source_exists(spec: ConnectorSpec) -> None:
    """A local source that is not there fails terminal, naming it, before anything touches it: SQLAlchemy would
    create an empty SQLite file on connect (and then find no table), and a missing folder would read as no files."""
    source = spec.source
    if isinstance(source, SqlDatabaseSource):
        from sqlalchemy.engine import make_url

        try:
            url = make_url(source.url)
        except Exception:  # an unparseable URL is SQLAlchemy's to report, with its own words
            return
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
                and not url.database.startswith("file:") and not Path(url.database).is_file():
            raise ConnectorRunError(spec.id, "extract", f"the SQLite database file {url.database} does not exist",
                                    failure_class=TERMINAL)
    elif isinstance(source, FilesystemSource) and source.folder is not None:
        folder = source.folder
        if not folder.is_dir():
            raise ConnectorRunError(spec.id, "extract", f"the folder {folder} does not exist",
                                    failure_class=TERMINAL)
        if not any(char in source.file_glob for char in "*?[") and not (folder / source.file_glob).is_file():
            raise ConnectorRunError(spec.id, "extract", f"the file {folder / source.file_glob} does not exist",
                                    failure_class=TERMINAL)


def _inside_folder(folder: Path, item: Any) -> bool:
    """False for a listed file that resolves (through a symlink) outside the connector's folder."""
    from dlt.common.storages.configuration import FilesystemConfiguration

    path = Path(FilesystemConfiguration.make_local_path(item["file_url"])).resolve()
    return path.is_relative_to(folder)


def load_factory(ref: str, connector_id: str) -> Callable[..., Any]:
    """Import `package.module:function`; a missing module or attribute is a terminal error."""
    module_name, _, attribute = ref.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConnectorRunError(connector_id, "extract", f"cannot import {ref}: {exc}", terminal=True) from None
