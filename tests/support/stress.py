"""`make stress-test`: the whole suite, several rounds in a row, each beside busy-looping processes that keep
every core loaded, each in a new random order. Stops at the first red round; prints each round's figures.

    .venv/bin/python -m tests.support.stress [--rounds 5] [--burners 2] [-- extra pytest arguments]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import subprocess
import sys
import time


def burn() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("STRESS_ROUNDS", 5)))
    parser.add_argument("--burners", type=int, default=int(os.environ.get("STRESS_BURNERS", os.cpu_count() or 2)),
                        help="busy-looping processes beside the suite (default: one per core)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after the Makefile's own")
    args = parser.parse_args()
    results: list[tuple[int, int, float, int]] = []
    for round_ in range(1, args.rounds + 1):
        seed = random.randrange(1, 2**31)
        burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
        for burner in burners:
            burner.start()
        print(f"\n=== stress round {round_}/{args.rounds}: {args.burners} CPU burner(s), --randomly-seed={seed}",
              flush=True)
        started = time.monotonic()
        try:
            code = subprocess.call([sys.executable, "-m", "pytest", f"--randomly-seed={seed}", *args.pytest_args])
        finally:
            for burner in burners:
                burner.kill()
                burner.join()
        load = os.getloadavg()[0]
        results.append((round_, code, time.monotonic() - started, seed))
        print(f"=== round {round_}: {'green' if code == 0 else f'RED (exit {code})'} in "
              f"{time.monotonic() - started:.0f} s, load average {load:.1f}", flush=True)
        if code != 0:
            break
    print("\nstress rounds:")
    for round_, code, seconds, seed in results:
        print(f"  round {round_}: {'green' if code == 0 else 'red'}  {seconds:5.0f} s  seed {seed}")
    green = sum(code == 0 for _, code, _, _ in results)
    print(f"{green} of {args.rounds} rounds green in a row" if green == args.rounds
          else f"stopped at round {len(results)} (red); {green} green before it")
    return 0 if green == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
