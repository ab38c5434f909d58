"""`python -m connectors check [FILE]`: validate connectors.yaml and print each connector, for CI of connector authors.

Exit status 0 when the file is valid, 1 (with the file, connector and field) when it is not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from connectors.registry import ConnectorRegistry, RegistryError, RegistrySettings


def check(path: Path) -> int:
    """Print every connector of `path` (secrets redacted); return the exit status."""
    try:
        registry = ConnectorRegistry.load(path)
    except RegistryError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    for spec in registry:
        public = spec.public_dict()
        source = public["source"]
        where = source.get("url") or source.get("bucket_url") or source.get("ref")
        schedule = public.get("schedule")
        print(f"{spec.id}: {spec.source.kind} {where} -> {spec.destination.kind} dataset {spec.dataset} "
              f"({spec.write_disposition})" + (f", schedule {schedule}" if schedule else ""))
    print(f"ok: {len(registry)} connector(s) in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m connectors", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate a connectors file")
    check_parser.add_argument("file", nargs="?", type=Path,
                              help="the connectors file (default: FLOWGATE_CONNECTORS, else connectors.yaml)")
    args = parser.parse_args(argv)
    return check(args.file or RegistrySettings().connectors_file)


if __name__ == "__main__":
    sys.exit(main())
