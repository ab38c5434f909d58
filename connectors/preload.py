"""Imported once by the forkserver that connector runs are forked from (connectors/isolated.py): what a run
uses, so every forked run starts with it loaded (dlt alone is ~1.4 s of imports here). Imports only: a process
that forks must not have started threads."""
from __future__ import annotations

import dlt  # noqa: F401
import dlt.destinations  # noqa: F401
import dlt.extract  # noqa: F401
import dlt.load  # noqa: F401
import dlt.normalize  # noqa: F401
import dlt.pipeline  # noqa: F401
import dlt.sources.filesystem  # noqa: F401
import dlt.sources.rest_api  # noqa: F401
import dlt.sources.sql_database  # noqa: F401
import duckdb  # noqa: F401
import pyarrow  # noqa: F401
from dlt.destinations.impl.duckdb import duck  # noqa: F401

import connectors.cursor_loader  # noqa: F401
import connectors.dlt_recovery  # noqa: F401
import connectors.pipeline  # noqa: F401
