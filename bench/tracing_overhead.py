"""Benchmark: what traces cost on the trigger path, against the same gateway without them, in one bench run.

The same load (--clients clients POSTing /trigger with a `traceparent`, one prober on /health) on a gateway that
only accepts (no executor: its runs queue, so no pipeline competes for the CPU), --rounds times each way,
alternating, so the machine's drift falls on both: without an OTLP endpoint (the default: the context is carried,
nothing recorded), and with one (the SDK, the WSGI, httpx and SQLAlchemy instrumentations, a batch exporter to a
receiver on this machine that decodes every export). Printed: accepted per second and trigger latency p50/p99 of
each round and of each way, and the ratios of traced to untraced.

    .venv/bin/python -m bench.tracing_overhead [--seconds 8 --rounds 3 --clients 8 --workers 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.trigger_throughput import Result, load, pct, write_connectors
from tests.support.gunicorn_server import GunicornServer
from tests.support.otlp_receiver import OtlpReceiver

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def run_gateway(workdir: Path, name: str, clients: int, seconds: float, workers: int, **env: str) -> Result:
    server = GunicornServer(workdir, workers=workers, ready_path="/health", FLOWGATE_EXECUTOR_THREADS="0",
                            FLOWGATE_MAX_QUEUED_PER_TARGET="100000", **env).start()
    try:
        return load(name, server.url, clients, seconds, headers={"traceparent": TRACEPARENT})
    finally:
        server.kill()


def merged(name: str, results: list[Result]) -> Result:
    """The rounds of one configuration as one result."""
    total = Result(name, sum(r.seconds for r in results))
    for r in results:
        total.triggers += r.triggers
        total.errors += r.errors
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="of each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    receiver = OtlpReceiver()
    off, on = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="flowgate-bench-") as tmp:
            workdir = Path(tmp)
            write_connectors(workdir, args.clients, 0)
            for _ in range(args.rounds):
                off.append(run_gateway(workdir, "off", args.clients, args.seconds, args.workers))
                on.append(run_gateway(workdir, "on", args.clients, args.seconds, args.workers,
                                      OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url))
    finally:
        receiver.stop()
    print(f"\n{args.clients} clients POSTing /trigger with a traceparent, {args.rounds} rounds of {args.seconds:g} s "
          f"each way, alternating; {args.workers} gunicorn workers accepting only; {len(receiver.spans)} spans "
          f"received\n")
    header = f"{'gateway':32} {'accepted/s':>10} {'trigger p50':>12} {'trigger p99':>12} {'errors':>6}"
    print(header)
    print("-" * len(header))
    without, traced = merged("without OTel (context only)", off), merged("with OTel (OTLP/HTTP export)", on)
    for r in (*off, *on, without, traced):
        print(f"{r.name:32} {r.accepted_per_second:10.1f} {pct(r.triggers, 50) * 1000:10.2f}ms "
              f"{pct(r.triggers, 99) * 1000:10.2f}ms {r.errors:6d}")
    print("\nratios (with OTel vs without, all rounds of this run):")
    print(f"  triggers accepted per second: {traced.accepted_per_second / without.accepted_per_second:6.2f}x")
    print(f"  trigger p50 latency:          {pct(traced.triggers, 50) / pct(without.triggers, 50):6.2f}x")
    print(f"  trigger p99 latency:          {pct(traced.triggers, 99) / pct(without.triggers, 99):6.2f}x")


if __name__ == "__main__":
    main()
