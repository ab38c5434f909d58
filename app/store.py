"""The run store's command line: `python -m app.store upgrade | current | downgrade REV | prune`, on DATABASE_URL."""
from __future__ import annotations

import argparse
import sys

from app.config import ConfigError, load_settings
from app.retention import Pruner
from app.runs import schema
from app.runs.store import RunStore


def main(argv: list[str] | None = None) -> int:
    """Run one store command; 0 on success, 2 on a bad setting."""
    parser = argparse.ArgumentParser(prog="python -m app.store", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="apply pending migrations (under a lock; safe beside running gateways)")
    commands.add_parser("current", help="print the schema's revision")
    down = commands.add_parser("downgrade", help="take the schema back to a revision")
    down.add_argument("revision")
    commands.add_parser("prune", help="delete ended runs older than FLOWGATE_RETENTION_DAYS, in batches")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = RunStore(settings.run_store_url)
    try:
        if args.command == "upgrade":
            schema.upgrade(store.db)
            print(f"run store at revision {schema.current_revision(store.db)}")
        elif args.command == "current":
            print(schema.current_revision(store.db) or "none (empty, or made by create_all before migrations)")
        elif args.command == "downgrade":
            schema.downgrade(store.db, args.revision)
            print(f"run store at revision {schema.current_revision(store.db)}")
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


if __name__ == "__main__":
    sys.exit(main())
