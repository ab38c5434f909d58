"""Benchmark: the seed's workflow scaled by 0.1, legacy vs optimized, and a 50-node wide workflow's overhead per node.

The seed's example: trigger 0.1 s -> http 0.2 s -> three llm nodes 0.5 s each -> join 0.1 s -> output 0.1 s, so a
critical path of 1.0 s and a sequential sum of 2.0 s. The http node calls a real local server that takes 0.2 s;
the llm nodes call a real local OpenAI-compatible server that takes 0.5 s; trigger, join and output get their
0.1 s from bench-only node types that wrap the built-in ones (one decorator line each).

Each mode runs end to end through a gateway (POST execute, the local executor claims the run, node states in
the SQLite run store); the wall time is the run record's own, from acceptance to recorded end (so the
benchmark's polling adds nothing); median of --repeat runs, interleaved.

    .venv/bin/python -m bench.workflow_latency [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flows.nodes import NODE_TYPES, NodeContext, node_type
from tests.support.fake_services import EchoService, FakeOpenAI

CRITICAL_PATH = 0.1 + 0.2 + 0.5 + 0.1 + 0.1


def _slowed(name: str, seconds: float) -> None:
    base = NODE_TYPES[name]

    @node_type(f"{name}_{int(seconds * 1000)}ms", base.config)
    def run(config: Any, ctx: NodeContext) -> Any:
        time.sleep(seconds)
        return base.run(config, ctx)


for _name in ("trigger", "join", "output"):
    _slowed(_name, 0.1)


def seed_workflow(echo_url: str) -> dict[str, Any]:
    llm = [{"id": f"llm{i}", "type": "llm", "config": {"prompt": f"take {i} on {{{{ nodes.fetch.output.body.slept }}}}"}}
           for i in range(1, 4)]
    return {"nodes": [{"id": "trigger", "type": "trigger_100ms"},
                      {"id": "fetch", "type": "http", "config": {"url": f"{echo_url}/sleep?s=0.2"}},
                      *llm, {"id": "join", "type": "join_100ms"}, {"id": "output", "type": "output_100ms"}],
            "connections": [{"from": "trigger", "to": "fetch"}, *({"from": "fetch", "to": n["id"]} for n in llm),
                            *({"from": n["id"], "to": "join"} for n in llm), {"from": "join", "to": "output"}]}


def wide_workflow(width: int, seconds: float) -> dict[str, Any]:
    middle = [{"id": f"n{i}", "type": "delay", "config": {"seconds": seconds}} for i in range(width)]
    return {"max_parallel": 64,
            "nodes": [{"id": "start", "type": "trigger"}, *middle, {"id": "join", "type": "join"}],
            "connections": [*({"from": "start", "to": n["id"]} for n in middle),
                            *({"from": n["id"], "to": "join"} for n in middle)]}


def execute(client: Any, workflow: dict[str, Any], mode: str) -> float:
    """Wall time of one execution: from its acceptance to its recorded end, as the run record says."""
    accepted = client.post("/api/workflow/bench/execute", json={"workflow": workflow, "mode": mode})
    assert accepted.status_code == 202, accepted.json
    deadline = time.monotonic() + 120
    while (doc := client.get(accepted.json["statusUrl"]).json)["status"] != "completed":
        assert doc["status"] in ("queued", "running") and time.monotonic() < deadline, doc
        time.sleep(0.05)
    created, finished = (datetime.fromisoformat(doc[key]) for key in ("createdAt", "finishedAt"))
    return (finished - created).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from app import create_app

    echo, openai = EchoService(), FakeOpenAI(api_key="bench", latency=0.5)
    with tempfile.TemporaryDirectory(prefix="flowgate-wf-bench-") as tmp:
        app = create_app({"var_dir": Path(tmp) / "var", "workflows_dir": Path(tmp) / "none", "poll_seconds": 0.02,
                          "http_allowed_hosts": f"127.0.0.1:{echo.port}", "llm_provider": "openai",
                          "llm_base_url": f"{openai.url}/v1", "llm_api_key": "bench", "executor_threads": 2})
        services = app.extensions["flowgate"]
        services.executor.start()
        client = app.test_client()
        try:
            seed = seed_workflow(echo.url)
            execute(client, seed, "optimized")  # warm-up: imports, connections, the SQLite file
            times: dict[str, list[float]] = {"legacy": [], "optimized": []}
            for _ in range(args.repeat):
                for mode in times:
                    times[mode].append(execute(client, seed, mode))
            legacy, optimized = (statistics.median(times[m]) for m in ("legacy", "optimized"))
            wide = {seconds: statistics.median(execute(client, wide_workflow(50, seconds), "optimized")
                                               for _ in range(args.repeat)) for seconds in (0.0, 0.2)}
        finally:
            services.executor.shutdown(timeout=10)
            services.store.dispose()
            echo.stop()
            openai.stop()

    print(f"\nWorkflow wall time through the gateway (accepted to recorded end), median of {args.repeat}")
    print(f"seed example x0.1: critical path {CRITICAL_PATH:.1f} s, sum of nodes 2.0 s")
    print(f"  legacy    {legacy:6.3f} s")
    print(f"  optimized {optimized:6.3f} s   speedup {legacy / optimized:.2f}x   "
          f"optimized / critical path {optimized / CRITICAL_PATH:.2f}")
    for seconds, wall in wide.items():
        print(f"wide: trigger -> 50 x delay {seconds:.1f} s -> join: {wall:6.3f} s, "
              f"overhead per node {(wall - seconds) / 52 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
