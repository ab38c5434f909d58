"""flowgate's command line, `python -m app ...`, on the same settings as the gateway (DATABASE_URL and the rest):

    python -m app store upgrade | current | downgrade REV | prune
    python -m app keys hash <key>        the digest a FLOWGATE_API_KEYS_FILE line keeps instead of the key
    python -m app settings reference [--update FILE]   the table of every setting (docs/operations.md holds it)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.auth import digest
from app.config import ConfigError, load_settings, reference_table, with_reference_table
from app.pruner import Pruner
from app.runs import migrate
from app.runs.store import RunStore


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on a bad setting."""
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = parser.add_subparsers(dest="group", required=True)
    store = groups.add_parser("store", help="the run store's schema and retention").add_subparsers(
        dest="command", required=True)
    store.add_parser("upgrade", help="apply pending migrations (under a lock; safe beside running gateways)")
    store.add_parser("current", help="print the schema's revision")
    store.add_parser("downgrade", help="take the schema back to a revision").add_argument("revision")
    store.add_parser("prune", help="delete ended runs older than FLOWGATE_RETENTION_DAYS, in batches")
    keys = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    keys.add_parser("hash", help="print a key's sha256 digest").add_argument("key")
    settings = groups.add_parser("settings", help="flowgate's settings").add_subparsers(dest="command", required=True)
    settings.add_parser("reference", help="print the Markdown table of every setting").add_argument(
        "--update", type=Path, metavar="FILE", help="write it into FILE, between its settings markers, instead")
    args = parser.parse_args(argv)
    if args.group == "keys":
        print(f"sha256:{digest(args.key).hex()}")
        return 0
    if args.group == "settings":
        if args.update is None:
            print(reference_table(), end="")
        else:
            args.update.write_text(with_reference_table(args.update.read_text(), reference_table()))
        return 0
    return store_command(args.command, getattr(args, "revision", None))


def store_command(command: str, revision: str | None) -> int:
    """One `store` command on the run store the settings name."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = RunStore(settings.run_store_url)
    try:
        if command == "upgrade":
            migrate.upgrade(store.db)
            print(f"run store at revision {migrate.current_revision(store.db)}")
        elif command == "current":
            print(migrate.current_revision(store.db) or "none (empty, or made by create_all before migrations)")
        elif command == "downgrade":
            migrate.downgrade(store.db, revision or "")
            print(f"run store at revision {migrate.current_revision(store.db)}")
        else:
            if not settings.retention_days:
                print("FLOWGATE_RETENTION_DAYS is 0: runs are kept forever")
                return 0
            pruned = Pruner(store, settings.retention_days, settings.retention_interval_seconds,
                            settings.retention_batch_size).prune_once()
            print("another process is pruning" if pruned is None
                  else f"pruned {pruned} ended run(s) older than {settings.retention_days:g} days")
    finally:
        store.dispose()
    return 0
