"""Rows land once in DuckDB even when a run is killed mid-load.

dlt notes a load job done in the package folder only after the job has committed its rows in the destination. A
process killed between the two leaves a started job with no note, and dlt restores such a job by running it again
(as it retries a job that raised after its commit): its rows would land twice. Here each of dlt's two DuckDB load
jobs (a file copied in, INSERT VALUES) writes a mark (load id, job id) in the same transaction as its rows, and a
job that finds its own mark there did commit before: it ends at once, as completed, without loading again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

MARKS_TABLE = "_flowgate_loaded_jobs"
_installing = threading.Lock()  # a workflow's connector nodes start their pipelines in parallel threads


def install() -> None:
    """Make dlt's two DuckDB load jobs skip a load their own mark says committed, and mark the one they commit."""
    from dlt.destinations.impl.duckdb.duck import DuckDbCopyJob
    from dlt.destinations.insert_job_client import InsertValuesLoadJob

    with _installing:
        if getattr(DuckDbCopyJob.run, "marks_loads", False):
            return
        copy, insert_values = DuckDbCopyJob.__dict__["run"], InsertValuesLoadJob.__dict__["run"]

        def copy_once(job: Any) -> None:
            if not _is_duckdb(job):  # MotherDuck, DuckLake: dlt's own behaviour
                return copy(job)
            with _marked_transaction(job) as loaded_before:
                if not loaded_before:
                    copy(job)  # dlt's one INSERT ... SELECT, in this transaction

        def insert_values_once(job: Any) -> None:
            if not _is_duckdb(job):
                return insert_values(job)
            with _marked_transaction(job) as loaded_before:
                if not loaded_before:  # dlt's own body, inside this transaction
                    for fragments in job._insert(job._sql_client.make_qualified_table_name(job.load_table_name),
                                                 job._file_path):
                        job._sql_client.execute_fragments(fragments)

        copy_once.marks_loads = insert_values_once.marks_loads = True  # type: ignore[attr-defined]
        DuckDbCopyJob.run, InsertValuesLoadJob.run = copy_once, insert_values_once


def _is_duckdb(job: Any) -> bool:
    from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient

    return type(job._job_client.sql_client) is DuckDbSqlClient


@contextmanager
def _marked_transaction(job: Any) -> Iterator[bool]:
    """The job's transaction: yields whether its mark is there already (then nothing is loaded), else marks it."""
    from dlt.common.storages.load_package import ParsedLoadJobFileName

    client = job._sql_client = job._job_client.sql_client
    table = client.make_qualified_table_name(MARKS_TABLE)
    key = (job._load_id, ParsedLoadJobFileName.parse(job.file_name()).job_id())  # no retry count in a job id
    _create_table(client, table)
    with client.begin_transaction():
        loaded_before = client.execute_sql(f"SELECT count(*) FROM {table} WHERE load_id = ? AND job_id = ?",
                                           *key)[0][0] > 0
        if loaded_before:
            log.info("load job %s of load %s committed before (its run stopped after it): not loaded again",
                     key[1], key[0])
        else:
            client.execute_sql(f"INSERT INTO {table} VALUES (?, ?)", *key)
        yield loaded_before


def _create_table(client: Any, table: str) -> None:
    """Before the job's transaction: jobs load side by side, and two transactions creating one table conflict
    (DuckDB's catalog write-write conflict); the one that lost finds it there on its next try."""
    from dlt.destinations.exceptions import DatabaseTransientException

    for attempt in range(10):
        try:
            client.execute_sql(f"CREATE TABLE IF NOT EXISTS {table} (load_id VARCHAR, job_id VARCHAR)")
            return
        except DatabaseTransientException:
            if attempt == 9:
                raise
            time.sleep(0.05)
