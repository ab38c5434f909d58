"""What flowgate adds to dlt so a killed run recovers: a DuckDB destination whose load jobs land rows once, the
repair of a package commit cut short, the row counts of a package loaded by another run than the one that made
it, and the abort of a package a schema contract refused. Everything flowgate knows of dlt's load and package
internals is here (connectors/cursor_loader.py, an extract through dlt's `table_loader_class` hook, explains its
own).

Over 300 lines because every assumption about dlt's internals belongs in this one module, to be re-read as one.
Checked against dlt 1.31.0 (the pin in requirements.txt). On a dlt upgrade, re-read this module against dlt's
source. The kill tests in tests/test_faults.py ("committed") and tests/test_dlt_recovery.py fail when an
assumption below stops holding.

Rows land once. dlt notes a load job done in its package folder only after the job committed its rows in the
destination. dlt PR #3767 (the `.pending_transitions/` markers) narrowed the window between the two, and its author
writes that "some kind of gap will always exist": a process killed there leaves a started job without a note,
which dlt restores by running it again (as it retries a job that raised after its commit), its rows twice. So
`flowgate_duckdb`, dlt's DuckDB destination subclassed as dlt subclasses it for MotherDuck, makes both of dlt's
DuckDB load jobs (a file copied in, INSERT VALUES) write a mark (load id, job id) into the dataset's
`_flowgate_loaded_jobs` in the same transaction as their rows; a job that finds its own mark there committed
before, and ends at once, completed, loading nothing. A job loading into the staging dataset (merge) marks in
the main dataset: one connection, one transaction across both.

Marks are pruned when a load completes: dlt calls `complete_load` once every job of the package is noted done in
its folder, so none of them runs again, and its marks go; so do marks of load ids older than 30 days (a package
dropped or aborted, a completion killed before its delete). The cost: should a package stay pending over 30 days
while another connector completes a load into its dataset, a job of it that committed before its run was killed
would load again.

Packages from another era. Runs of one connector may use different working folders (hosts with their own var/)
on one destination. A run killed before its load leaves its package in its folder; a run elsewhere then loads the
same rows from the same state (dlt advances a cursor only with a completed load). When a run comes back to the
first folder, dlt restores the destination's newer (or equal) state but still loads the old package (it only
warns): rows twice with append, older versions over newer with merge. `stale_packages` tells such packages by
the state they were made on: one the destination already holds (or a newer one) belongs to a load made since.

Rows a recovery loads. dlt knows a package's rows per table only in the process that made it (its ExtractInfo,
NormalizeInfo); a run that loads a killed run's package would report none of its rows. `PackageRows` keeps them
beside the packages, in the pipeline's working folder: written after extract and again after normalize (nested
tables counted), taken when the package loads. dlt commits a package before its step returns; a process killed in
between leaves the earlier count, or none after extract, and then recover normalizes the package itself.

A package a schema contract refused. dlt's normalize stops on it and leaves the extracted package pending: every
later run's recover would normalize it again, and fail again. `abort_refused_packages` aborts it as dlt's
`abort_packages` does, which also rewinds the local state and schemas (an incremental cursor included) to where
the package started: the next run extracts the same rows again, under the contract it has then.

What this relies on in dlt, beyond its public API:
- `Pipeline._restore_state_from_destination` returns the newest state a completed load stored (it joins
  `_dlt_loads` with status 0), as `sync_destination` reads it;
- `DuckDbClient.create_load_job` returns a `DuckDbCopyJob` or an `InsertValuesLoadJob` for data files; a job's
  `_job_client` is the worker thread's client (dlt's own job classes read it the same way);
- `DuckDbCopyJob.run` opens no transaction; `InsertValuesLoadJob.run` iterates `_insert()` inside its one;
- `complete_load` runs once every job of the package is noted done in its folder;
- dlt commits a normalized package by renaming it into `load/normalized/`, then deleting `normalize/extracted/`;
- a package keeps its load id from extract to load, and `Pipeline.drop()` wipes the working folder as a whole;
- a resolved credentials instance passed to a destination factory is used as it is by every configuration dlt
  resolves from it (so the run's clients share one `DuckDbConnectionPool`), and while a connection of the pool is
  borrowed, the pool hands the clients made meanwhile duplicates of it (one DuckDB instance);
- `Destination.capabilities()` without a config resolves the one `flowgate_duckdb._explicit_config` makes, and
  DuckDB's capabilities adjust to the naming only (tests/test_dlt_recovery.py compares them with dlt's own);
- incremental cursors live in the pipeline state at `sources.<source>.resources.<resource>.incremental.<cursor
  path>`, as `{initial_value, last_value, ...}`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dlt
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.storages import LoadStorage, NormalizeStorage
from dlt.destinations.exceptions import DatabaseTransientException
from dlt.destinations.impl.duckdb.duck import DuckDbClient, DuckDbCopyJob
from dlt.destinations.insert_job_client import InsertValuesLoadJob

log = logging.getLogger(__name__)

MARKS_TABLE = "_flowgate_loaded_jobs"
MARKS_KEPT_SECONDS = 30 * 24 * 3600


class flowgate_duckdb(dlt.destinations.duckdb):  # noqa: N801 (dlt names its destination factories so)
    """dlt's DuckDB destination whose copy and INSERT VALUES load jobs land their rows once; made once per run
    (`for_run`), with its credentials resolved once and its capabilities' configuration too."""

    @classmethod
    def for_run(cls, path: str, pipeline_name: str) -> flowgate_duckdb:
        """The destination of one run into the DuckDB file at `path`. dlt resolves a destination's credentials
        from every config provider each time it makes a client or asks its capabilities (12 times in a trivial
        run); here they are resolved once, as dlt would in the pipeline's sections, and every client of the run
        then shares them, and with them dlt's connection pool (`pipeline.sql_client()` held open: one DuckDB
        instance for the clients made meanwhile, connectors/pipeline.py)."""
        from dlt.common.configuration import inject_section
        from dlt.common.configuration.specs import ConfigSectionContext

        unresolved = cls(credentials=path, destination_name="duckdb")
        with inject_section(ConfigSectionContext(pipeline_name=pipeline_name)):
            credentials = unresolved.configuration(unresolved.spec(), accept_partial=True).credentials
        if credentials is None or not credentials.is_resolved():
            return unresolved  # dlt will say what is missing when a client needs it
        return cls(credentials=credentials, destination_name="duckdb")

    def capabilities(self, config: Any = None, naming: Any = None) -> Any:
        # Without a config, dlt resolves one from every provider on each call (~2 ms of CPU; 12 calls in a trivial
        # run). That configuration is the same all run long (DuckDB's capabilities only adjust to the naming):
        # resolved once, here, as dlt does it.
        if config is None:
            config = self.__dict__.get("_capabilities_config")
            if config is None:
                config = self.__dict__["_capabilities_config"] = self._explicit_config()
        return super().capabilities(config, naming)

    def _explicit_config(self) -> Any:
        """The configuration dlt's `capabilities()` resolves when given none (dlt 1.31.0's, line for line): the
        factory's explicit parameters, completed from the providers as far as they go, on a copy of its
        credentials."""
        init_config = self.spec()
        init_config.update(self.config_params)
        credentials: Any
        if not init_config.credentials:
            credentials = self.spec.credentials_type(init_config)()
            credentials.__is_resolved__ = True
        else:
            credentials = init_config.credentials
            if isinstance(credentials, BaseConfiguration):
                credentials = credentials.copy()
        config = self.spec(credentials=credentials)
        try:
            config = self.configuration(config, accept_partial=True)
        except Exception:  # as dlt: an explicit value that does not parse leaves the configuration empty
            pass
        return config

    @property
    def client_class(self) -> type[MarkedDuckDbClient]:
        return MarkedDuckDbClient


class MarkedDuckDbClient(DuckDbClient):
    """dlt's DuckDB job client: its load jobs mark their commit, and a completed load prunes the marks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Named now, in the main dataset: a job loading into the staging dataset switches the client to it.
        self.marks_table = self.sql_client.make_qualified_table_name(MARKS_TABLE)

    def create_load_job(self, table: Any, file_path: str, load_id: str, restore: bool = False) -> Any:
        job = super().create_load_job(table, file_path, load_id, restore)
        marked = MARKED_JOBS.get(type(job))
        return marked(file_path, LoadMark(load_id, job.job_id(), self.marks_table)) if marked else job

    def complete_load(self, load_id: str) -> None:
        super().complete_load(load_id)
        create_marks_table(self.sql_client, self.marks_table)  # a load may have had no marked job
        self.sql_client.execute_sql(
            f"DELETE FROM {self.marks_table} WHERE load_id = ? OR TRY_CAST(load_id AS DOUBLE) < ?",
            load_id, time.time() - MARKS_KEPT_SECONDS)


@dataclass(frozen=True)
class LoadMark:
    """A load job's mark: its load id and job id (which has no retry count: a retry finds its first try's mark)."""

    load_id: str
    job_id: str
    table: str

    def claim(self, client: Any) -> bool:
        """In the job's transaction: write the mark and say True, or say False when it is there (committed before)."""
        key = (self.load_id, self.job_id)
        if client.execute_sql(f"SELECT count(*) FROM {self.table} WHERE load_id = ? AND job_id = ?", *key)[0][0]:
            log.info("load job %s of load %s committed before (its run stopped after it): not loaded again",
                     self.job_id, self.load_id)
            return False
        client.execute_sql(f"INSERT INTO {self.table} VALUES (?, ?)", *key)
        return True


class MarkedCopyJob(DuckDbCopyJob):
    """dlt's copy job (Parquet, JSONL): its INSERT ... SELECT commits with its mark."""

    def __init__(self, file_path: str, mark: LoadMark) -> None:
        super().__init__(file_path)
        self.mark = mark

    def run(self) -> None:
        client = self._job_client.sql_client
        create_marks_table(client, self.mark.table)
        with client.begin_transaction():
            if self.mark.claim(client):
                super().run()


class MarkedInsertValuesJob(InsertValuesLoadJob):
    """dlt's INSERT VALUES job: its inserts commit with its mark."""

    def __init__(self, file_path: str, mark: LoadMark) -> None:
        super().__init__(file_path)
        self.mark = mark

    def run(self) -> None:
        create_marks_table(self._job_client.sql_client, self.mark.table)
        super().run()  # dlt's one transaction, around its iteration of _insert() below

    def _insert(self, qualified_table_name: str, file_path: str) -> Iterator[list[str]]:
        if self.mark.claim(self._job_client.sql_client):
            yield from super()._insert(qualified_table_name, file_path)


MARKED_JOBS: dict[type, type] = {DuckDbCopyJob: MarkedCopyJob, InsertValuesLoadJob: MarkedInsertValuesJob}


def create_marks_table(client: Any, table: str) -> None:
    """The marks table and its unique key, if missing (a file marked before the key existed gets it; a second
    mark of one job would fail its transaction, rows and all). Before the job's transaction: jobs load side by
    side, and two transactions creating one table conflict (DuckDB's catalog write-write conflict); the one that
    lost finds it there on its next try."""
    for attempt in range(10):
        try:
            client.execute_sql(f"CREATE TABLE IF NOT EXISTS {table} (load_id VARCHAR, job_id VARCHAR)")
            client.execute_sql(f"CREATE UNIQUE INDEX IF NOT EXISTS {MARKS_TABLE}_key ON {table} (load_id, job_id)")
            return
        except DatabaseTransientException:
            if attempt == 9:
                raise
            time.sleep(0.05)


def complete_interrupted_commits(working_dir: Path) -> None:
    """dlt commits a normalized package by renaming it into load/normalized/ and then deleting its extracted
    files; a process killed between the two leaves both. Normalizing the extracted copy again would fail (the
    package folder exists: "Directory not empty") or, once loaded, load the data twice: finish the commit
    instead, as dlt would have."""
    extracted = working_dir / "normalize" / NormalizeStorage.EXTRACTED_FOLDER
    committed = [working_dir / "load" / folder for folder in (LoadStorage.NORMALIZED_FOLDER, LoadStorage.LOADED_FOLDER)]
    for package in (extracted.iterdir() if extracted.is_dir() else ()):
        if any((folder / package.name).exists() for folder in committed):
            shutil.rmtree(package)


def stale_packages(pipeline: Any) -> bool:
    """Whether `pipeline` (a dlt Pipeline) has pending packages made on a state the destination already holds, or
    older: another folder loaded since, from that state, and their rows with it."""
    from dlt.common.destination.exceptions import DestinationUndefinedEntity

    if not pipeline.has_pending_data:
        return False
    try:
        remote = pipeline._restore_state_from_destination()
    except DestinationUndefinedEntity:  # nothing was ever loaded there: no other folder loaded either
        return False
    return remote is not None and remote["_state_version"] >= pipeline.state["_state_version"]


class PackageRows:
    """Rows per table of each pending load package of one pipeline folder, until the package loads."""

    FOLDER = "flowgate_rows"

    def __init__(self, working_dir: Path):
        self.folder = working_dir / self.FOLDER

    def record(self, load_id: str, rows: dict[str, int]) -> None:
        """Keep (or replace) the package's counts; written whole or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{load_id}.json.partial"
        partial.write_text(json.dumps(rows))
        os.replace(partial, self.folder / f"{load_id}.json")

    def take(self, load_id: str) -> dict[str, int] | None:
        """The counts of a package that has loaded, forgotten from now on; None when none were kept."""
        path = self.folder / f"{load_id}.json"
        try:
            rows = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        path.unlink()
        return rows

    def keep_only(self, load_ids: Iterable[str]) -> None:
        """Forget the counts of packages no longer pending (dropped as stale, aborted)."""
        keep = {f"{load_id}.json" for load_id in load_ids}
        for path in (self.folder.iterdir() if self.folder.is_dir() else ()):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def abort_refused_packages(pipeline: Any) -> bool:
    """Abort the extracted packages of `pipeline` (a dlt Pipeline) after normalize refused one, rewinding its
    state and schemas; False (nothing done) while a normalized package waits, as dlt would abort that one too
    (recover loads such a package before it normalizes anything, so none waits here)."""
    if pipeline.list_normalized_load_packages():
        log.warning("pipeline %s: the refused package is left pending: a normalized package waits before it",
                    pipeline.pipeline_name)
        return False
    pipeline.abort_packages()
    return True


def incremental_cursors(state: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(resource, cursor path) -> `{initial_value, last_value}` of every incremental cursor in a pipeline state."""
    cursors = {}
    for source in (state.get("sources") or {}).values():
        for resource, resource_state in (source.get("resources") or {}).items():
            for cursor_path, cursor in (resource_state.get("incremental") or {}).items():
                cursors[(resource, cursor_path)] = {"initial_value": cursor.get("initial_value"),
                                                    "last_value": cursor.get("last_value")}
    return cursors
