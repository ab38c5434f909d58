"""Rows land once in DuckDB even when a run is killed mid-load.

dlt notes a load job done in the package folder only after the job has committed its rows in the destination. A
process killed between the two leaves a started job with no note, and dlt restores such a job by running it again:
its rows land twice. Here every DuckDB load job also writes a mark (load id, job file) in the same transaction as
its rows, and before a run loads the packages a killed run left, `note_marked_jobs` notes each marked job done, as
dlt would have, so that dlt does not run it again. A job with no mark did not commit: dlt runs it, once.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

MARKS_TABLE = "_flowgate_loaded_jobs"


@functools.cache
def install() -> None:
    """Make dlt's two DuckDB load jobs (a file copy, INSERT VALUES) write their mark with their rows."""
    from dlt.destinations.impl.duckdb.duck import DuckDbCopyJob
    from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient
    from dlt.destinations.insert_job_client import InsertValuesLoadJob

    copy = DuckDbCopyJob.run
    insert_values = InsertValuesLoadJob.run

    def copy_with_mark(job: Any) -> None:
        job._sql_client = job._job_client.sql_client
        _create_table(job._sql_client)
        with job._sql_client.begin_transaction():  # dlt's one INSERT ... SELECT, in this transaction
            copy(job)
            _mark(job)

    def insert_values_with_mark(job: Any) -> None:
        if not isinstance(job._job_client.sql_client, DuckDbSqlClient):
            return insert_values(job)
        job._sql_client = job._job_client.sql_client
        _create_table(job._sql_client)
        with job._sql_client.begin_transaction():  # dlt's own body, with the mark before the commit
            for fragments in job._insert(job._sql_client.make_qualified_table_name(job.load_table_name),
                                         job._file_path):
                job._sql_client.execute_fragments(fragments)
            _mark(job)

    DuckDbCopyJob.run = copy_with_mark
    InsertValuesLoadJob.run = insert_values_with_mark


def _create_table(client: Any) -> None:
    """The marks table, before the job's transaction: jobs load side by side, and two transactions creating one
    table conflict (DuckDB's catalog write-write conflict); the one that lost finds it there on its next try."""
    from dlt.destinations.exceptions import DatabaseTransientException

    for attempt in range(10):
        try:
            client.execute_sql(f"CREATE TABLE IF NOT EXISTS {client.make_qualified_table_name(MARKS_TABLE)} "
                               f"(load_id VARCHAR, file_name VARCHAR)")
            return
        except DatabaseTransientException:
            if attempt == 9:
                raise
            time.sleep(0.05)


def _mark(job: Any) -> None:
    client = job._sql_client
    client.execute_sql(f"INSERT INTO {client.make_qualified_table_name(MARKS_TABLE)} VALUES (?, ?)",
                       job._load_id, job.file_name())


def note_marked_jobs(pipeline: Any) -> list[str]:
    """For the packages a killed run left: note each started job whose mark is in DuckDB as completed; return
    their file names. dlt's load then takes them as done instead of running them again."""
    from dlt.destinations.exceptions import DatabaseUndefinedRelation

    packages = pipeline._get_load_storage().normalized_packages
    unnoted: dict[tuple[str, str], None] = {}
    for load_id in packages.list_packages():
        noted = set(packages.list_pending_transitions(load_id))
        for path in packages.list_started_jobs(load_id):
            if os.path.basename(path) not in noted:
                unnoted[(load_id, os.path.basename(path))] = None
    if not unnoted:
        return []
    marked: set[tuple[str, str]] = set()
    with pipeline.sql_client() as client:
        for dataset in (client.dataset_name, client.staging_dataset_name):  # merge jobs load the staging one
            with client.with_alternative_dataset_name(dataset):
                load_ids = sorted({load_id for load_id, _ in unnoted})
                try:
                    rows = client.execute_sql(f"SELECT load_id, file_name FROM "
                                              f"{client.make_qualified_table_name(MARKS_TABLE)} "
                                              f"WHERE load_id IN ({', '.join('?' * len(load_ids))})", *load_ids)
                except DatabaseUndefinedRelation:
                    continue
            marked.update((load_id, file_name) for load_id, file_name in rows or ())
    found = [key for key in unnoted if key in marked]
    for load_id, file_name in found:
        packages.save_pending_transition(load_id, file_name, "completed")
    if found:
        log.info("load jobs a killed run had committed, noted done: %s", ", ".join(name for _, name in found))
    return [name for _, name in found]
