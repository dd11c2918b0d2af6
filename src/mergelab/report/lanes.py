"""Chapters side by side: after the first chapter, a report's notebooks run ``jobs`` at a time.

Chapter 00 builds what the others read (the data, the pretrained encoder, the experts), so it runs
first, alone; the chapters after it do not read one another, and each trains or evaluates small models
whose single run gains little from a second thread (the design record, docs/tiny-benchmark.md, has the
step times). They run in ``jobs`` processes (``python -m mergelab.report.lanes``), each with
``cores // jobs`` torch threads (the kernel inherits ``OMP_NUM_THREADS``; cores as this process's CPU
affinity allows), each writing its own executed notebook, stamp and timing record; a lane's output goes
to ``<reports>/.<notebook>.lane.log``, shown when it fails. The chapters after 00 train runs of their
own (other recipes, other keys); what two of them share is built through :class:`mergelab.cache.Artifact`,
under a file lock, so once. A chapter's own ``workers`` are not scaled down: chapters 01 and 02 at
``workers: 2`` side by side briefly run four training processes on two cores.
The trained models do not depend on ``jobs``: the tiny size trains every run on one thread whatever the
process's setting (:attr:`mergelab.benchmarks.tiny.TinyBenchmark.train_threads`), and its evaluations gave
bit-identical logits at one and two threads; computations that reduce across threads (Hessian-vector
products, decompositions) may differ in their last bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from mergelab.params import ReportError

from mergelab.utils import read_json

from .timings import TIMINGS_DIR, usable_cores


def resolve_jobs(jobs: int | str | None, notebooks: int) -> int:
    """The number of lanes: ``"auto"`` (or ``None``) one per core, at most 4; never more than the
    chapters after the first (``notebooks - 1``), never below 1."""
    if jobs in (None, "auto"):
        jobs = min(usable_cores(), 4)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ReportError(f"jobs={jobs!r} is not valid; use a positive integer or 'auto'.")
    return max(1, min(jobs, notebooks - 1))


def lane_threads(jobs: int) -> int:
    """Torch threads per lane: the cores shared out, at least one."""
    return max(1, usable_cores() // max(1, jobs))


def _say(line: str) -> None:
    """One line to stdout in one write, so lines of lanes starting and ending together do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run_lane(notebook: Path, parameters: dict[str, Any], profile: str, reports: Path, digest: str,
              threads: int) -> dict[str, Any]:
    _say(f"executing: {notebook.stem} (profile {profile}, in a lane)")
    reports = Path(reports)
    spec = reports / f".{notebook.stem}.lane.json"
    log = reports / f".{notebook.stem}.lane.log"
    spec.write_text(json.dumps({"notebook": str(notebook), "parameters": parameters, "profile": profile,
                                "reports": str(reports), "digest": digest}, default=str))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "mergelab.report.lanes", str(spec)], env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    spec.unlink(missing_ok=True)
    record = reports / TIMINGS_DIR / f"{notebook.stem}.{profile}.json"  # written by the lane once it succeeded
    timing = read_json(record) if done.returncode == 0 else None
    if timing is None:
        tail = log.read_text(errors="replace")[-3000:]
        raise ReportError(f"notebook {notebook.name} failed in its lane (exit {done.returncode}); its output, "
                          f"kept in {log}, ends with:\n{tail}")
    log.unlink(missing_ok=True)
    return timing


def run_in_lanes(plan: Sequence[tuple[Path, dict[str, Any], str]], profile: str, reports: Path,
                 jobs: int) -> dict[str, dict[str, Any]]:
    """Execute ``plan`` (``(notebook, parameters, digest)`` each) in ``jobs`` processes; return each
    notebook's timing record. A failure stops nothing already running; at the end one error names every
    failed chapter and shows the first one's output (each keeps its log)."""
    threads = lane_threads(jobs)
    _say(f"running {len(plan)} chapters {jobs} at a time ({threads} torch thread(s) each)")
    timings: dict[str, dict[str, Any]] = {}
    errors: list[ReportError] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for notebook, parameters, digest in plan:
            futures[pool.submit(_run_lane, notebook, parameters, profile, reports, digest, threads)] = notebook
        for future in as_completed(futures):
            notebook = futures[future]
            try:
                timing = future.result()
            except ReportError as err:
                errors.append(err)
                continue
            timings[notebook.stem] = timing
            _say(f"executed: {notebook.stem} in {timing['wall_s']:.1f} s (in a lane, {timing['cache']} data cache)")
    if len(errors) == 1:
        raise errors[0]
    if errors:  # every failing chapter named, the first one's output shown
        names = ", ".join(str(e).split(" failed", 1)[0].removeprefix("notebook ") for e in errors)
        raise ReportError(f"{len(errors)} chapters failed in their lanes ({names}); the first:\n{errors[0]}")
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """One lane: execute the notebook a spec file names, stamp it and write its timing record."""
    from .runner import execute_and_record

    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    execute_and_record(Path(spec["notebook"]), spec["parameters"], spec["profile"], Path(spec["reports"]),
                       spec["digest"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
