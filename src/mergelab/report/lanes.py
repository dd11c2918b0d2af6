"""Chapters side by side: after the first chapter, a report's notebooks run ``jobs`` at a time.

Chapter 00 builds what the others read (the data, the pretrained encoder, the experts), so it runs
first, alone; the chapters after it do not read one another, and each trains or evaluates a small model
whose single run gains little from a second thread (on the 2-core development machine one fine-tuning
run of the tiny encoder took 3.35 s per 100 steps at one thread and 3.65 s at two). They run in ``jobs``
processes (``python -m mergelab.report.lanes``), each with ``cores // jobs`` torch threads (the kernel
inherits ``OMP_NUM_THREADS``), each writing its own executed notebook, stamp and timing record; a lane's
output goes to ``<reports>/.<notebook>.lane.log``, shown when it fails. Every trained artifact is built
under a file lock (:class:`mergelab.cache.Artifact`), so two chapters that need the same one build it once.
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


def resolve_jobs(jobs: int | str | None, notebooks: int) -> int:
    """The number of lanes: ``"auto"`` (or ``None``) one per core, at most 4; never more than the
    chapters after the first (``notebooks - 1``), never below 1."""
    if jobs in (None, "auto"):
        jobs = min(os.cpu_count() or 1, 4)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ReportError(f"jobs={jobs!r} is not valid; use a positive integer or 'auto'.")
    return max(1, min(jobs, notebooks - 1))


def lane_threads(jobs: int) -> int:
    """Torch threads per lane: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _run_lane(notebook: Path, parameters: dict[str, Any], profile: str, reports: Path, digest: str,
              threads: int) -> dict[str, Any]:
    print(f"executing: {notebook.stem} (profile {profile}, in a lane)", flush=True)
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
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise ReportError(f"notebook {notebook.name} failed in its lane (exit {done.returncode}); its output, "
                          f"kept in {log}, ends with:\n{tail}")
    timing = json.loads(log.read_text(errors="replace").strip().splitlines()[-1])
    log.unlink(missing_ok=True)
    return timing


def run_in_lanes(plan: Sequence[tuple[Path, dict[str, Any], str]], profile: str, reports: Path,
                 jobs: int) -> dict[str, dict[str, Any]]:
    """Execute ``plan`` (``(notebook, parameters, digest)`` each) in ``jobs`` processes; return each
    notebook's timing record. A failure stops nothing already running; the first is raised at the end."""
    threads = lane_threads(jobs)
    print(f"running {len(plan)} chapters {jobs} at a time ({threads} torch thread(s) each)")
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
            print(f"executed: {notebook.stem} in {timing['wall_s']:.1f} s (in a lane, {timing['cache']} data cache)",
                  flush=True)
    if errors:
        raise errors[0]
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """One lane: execute the notebook a spec file names, stamp it, record its timing (printed last, as JSON)."""
    from .runner import execute_and_record

    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    timing = execute_and_record(Path(spec["notebook"]), spec["parameters"], spec["profile"], Path(spec["reports"]),
                                spec["digest"])
    print(json.dumps(timing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
