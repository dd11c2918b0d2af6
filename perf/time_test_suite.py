"""Time ``make test`` as CI runs it: once with an empty data cache (cold), then again on the cache the
first run filled (warm). Prints wall and CPU seconds, the cores and the load average around each run.

The budget (issues 22 and 26): ``make test`` within 5 minutes on a 2-core machine with an empty
cache. Run it on an otherwise idle machine: ``python perf/time_test_suite.py`` (about 10 minutes).
Not named ``bench_*``: ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(data_dir: Path, pytest_args: str) -> dict[str, float]:
    """One ``make test`` with ``MERGELAB_DATA_DIR=data_dir``; its wall and CPU seconds and exit code."""
    env = {**os.environ, "MERGELAB_DATA_DIR": str(data_dir)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(["make", "test", f"PYTEST_ARGS={pytest_args}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_before": load, "load_after": os.getloadavg()[0], "returncode": done.returncode,
            "summary": tail[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pytest-args", default="-q", help="PYTEST_ARGS for make test (default: -q)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget in seconds")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores; budget {args.budget_s:.0f} s wall for a cold make test")
    with tempfile.TemporaryDirectory(prefix="mergelab-suite-") as tmp:
        for label in ("cold", "warm"):
            r = run_suite(Path(tmp) / "data", args.pytest_args)
            verdict = "within" if r["wall_s"] <= args.budget_s else "OVER"
            print(f"{label}: {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, load {r['load_before']:.1f} -> "
                  f"{r['load_after']:.1f}, exit {r['returncode']} ({r['summary']}); {verdict} the budget")
            if r["returncode"] != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
