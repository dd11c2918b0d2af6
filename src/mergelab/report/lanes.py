"""Chapters side by side: a report's notebooks run ``jobs`` at a time.

Chapter 00 builds what most others read (the data, the pretrained encoder, the experts), so it runs
first, here, in the report's own process, with its progress on the console. It holds one of the ``jobs``
lanes; the chapters whose notebook says they need none of it (``metadata.mergelab.waits_for_first_chapter:
false``: chapters 01 and 06, which train runs of their own from the pretrained encoder or from scratch)
start beside it in the other lanes, and the rest once it is done, the longest first by the last measured
CPU times (wall times for records that have none). The chapters after 00 do not read one another, and
each trains or evaluates small models whose single run gains little from a second thread (the design
record, docs/tiny-benchmark.md, has the step times). They run in processes
(``python -m mergelab.report.lanes``), each with ``cores // jobs`` torch threads (the kernel inherits
``OMP_NUM_THREADS``; cores as this process's CPU affinity allows; ``jobs`` counted on the whole book, not on the
chapters selected or out of date, so a chapter run again alone keeps the thread count of the full build), each
writing its own executed notebook, stamp and timing record; a lane's output goes to
``<reports>/.<notebook>.lane.log``, shown when it fails. What two chapters share (the generated data, the
pretrained encoder, the heads, an expert) is built through :func:`mergelab.cache.build_lock`, under a file
lock, so once. A chapter's own ``workers`` are not scaled down: chapters with ``workers: 2`` side by side
briefly run four training processes on two cores.
The trained models do not depend on ``jobs``: the tiny size trains every run, and builds its heads (whose
digests key every run), on one thread whatever the process's setting
(:attr:`mergelab.benchmarks.tiny.TinyBenchmark.train_threads`), and its evaluations gave bit-identical logits
at one and two threads; computations that reduce across threads (Hessian-vector products, decompositions)
may differ in their last bits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mergelab.params import ReportError

from mergelab.utils import atomic_write_text, environment, read_json

from .timings import TIMINGS_DIR, collect, cpu_text, read_record, run_child, usable_cores


def resolve_jobs(jobs: int | str | None, notebooks: int) -> int:
    """The number of lanes: ``"auto"`` (or ``None``) one per core, at most 4; never more than the
    chapters to run (the first holds a lane too), never below 1."""
    if jobs in (None, "auto"):
        jobs = min(usable_cores(), 4)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ReportError(f"jobs={jobs!r} is not valid; use a positive integer or 'auto'.")
    return max(1, min(jobs, notebooks))


def lane_threads(jobs: int) -> int:
    """Torch threads per lane: the cores shared out, at least one."""
    return max(1, usable_cores() // max(1, jobs))


def _say(line: str) -> None:
    """One line to stdout in one write, so lines of lanes starting and ending together do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


BESIDE_FIRST_NICE = 19
"""Niceness of a lane started while the first chapter runs: it takes the CPU time the first chapter leaves
(its single-threaded stretches), not the time it needs, since the chapters waiting for it are the book's
critical path. Such a lane keeps it to its end; alone on the machine it runs at full speed."""


def lane_thread_environment(threads: int) -> dict[str, str]:
    """The variables that give a chapter's kernel ``threads`` torch (OpenMP, MKL) threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _run_lane(notebook: Path, parameters: dict[str, Any], profile: str, reports: Path, digest: str,
              threads: int, nice: int = 0, environ: dict[str, str] | None = None) -> dict[str, Any]:
    _say(f"executing: {notebook.stem} (profile {profile}, in a lane)")
    reports = Path(reports)
    spec = reports / f".{notebook.stem}.lane.json"
    log = reports / f".{notebook.stem}.lane.log"
    atomic_write_text(spec, json.dumps({"notebook": str(notebook), "parameters": parameters, "profile": profile,
                                "reports": str(reports), "digest": digest, "nice": nice}, default=str))
    env = {**(os.environ if environ is None else environ), **lane_thread_environment(threads)}
    with open(log, "w") as out:  # reaped through run_child: the first chapter's CPU time does not count it
        code, _ = run_child([sys.executable, "-m", "mergelab.report.lanes", str(spec)], env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    spec.unlink(missing_ok=True)
    record = reports / TIMINGS_DIR / f"{notebook.stem}.{profile}.json"  # written by the lane once it succeeded
    timing = read_json(record) if code == 0 else None
    if timing is None:
        tail = log.read_text(errors="replace")[-3000:]
        raise ReportError(f"notebook {notebook.name} failed in its lane (exit {code}); its output, "
                          f"kept in {log}, ends with:\n{tail}")
    log.unlink(missing_ok=True)
    return timing


WAITS_KEY = "waits_for_first_chapter"
"""Notebook metadata (``metadata.mergelab.waits_for_first_chapter``): ``false`` for a chapter that reads
nothing the first chapter builds (it trains its own models, or only needs the pretrained encoder, which the
cache builds once under a lock whoever asks first), so it may start beside it. Absent: it waits."""


def waits_for_first(notebook: Path) -> bool:
    """Whether ``notebook`` must wait for the first chapter (see :data:`WAITS_KEY`)."""
    meta = json.loads(Path(notebook).read_text(encoding="utf-8")).get("metadata", {}).get("mergelab", {})
    value = meta.get(WAITS_KEY, True)
    if not isinstance(value, bool):
        raise ReportError(f"{notebook}: metadata.mergelab.{WAITS_KEY}={value!r} is not valid; use true or false.")
    return value


def expected_seconds(reports: Path, profile: str) -> dict[str, float]:
    """Each chapter's work in the last measured run, to start the longest first: its CPU time where every
    record has one (a wall time includes the waiting of a chapter that ran beside chapter 00 at low priority,
    so it says more about the schedule of that run than about the chapter), else its wall time. From the
    committed record of a cold run (``<reports>/timings-<profile>.json``) where there is one, else this
    folder's last records."""
    committed = read_record(Path(reports) / f"timings-{profile}.json") or {}
    records = committed.get("chapters") or collect(reports, profile)
    key = "cpu_s" if records and all(r.get("cpu_s") is not None for r in records) else "wall_s"
    return {r["notebook"]: float(r[key]) for r in records if r.get(key) is not None}


def run_in_lanes(plan: Sequence[tuple[Path, dict[str, Any], str]], profile: str, reports: Path,
                 jobs: int, first: Callable[[], Any] | None = None, threads: int | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Execute ``plan`` (``(notebook, parameters, digest)`` each) in ``jobs`` lanes; return each notebook's
    timing record.

    ``first`` (the first chapter, run here, in this process, with its progress on the console, at the
    lanes' thread count) holds one lane: while it runs, the chapters that do not wait for it
    (:func:`waits_for_first`) start in the other ``jobs - 1`` lanes, at niceness
    :data:`BESIDE_FIRST_NICE`: they live on the CPU time the first chapter leaves, and keep their low
    priority to their end. Once it is done the others start. Among the chapters free to start, the longest
    (:func:`expected_seconds`; unmeasured ones first, in plan order) goes first, so that no lane is left
    alone at the end with a long chapter. A failure stops nothing already running; at the end one error
    names every failed chapter and shows the first one's output (each keeps its log). If ``first`` fails,
    the chapters waiting for it do not run, and its error is raised once the running lanes are done.
    ``threads``: torch threads of every chapter (``None``: the cores shared out among the ``jobs`` lanes).
    """
    threads = lane_threads(jobs) if threads is None else threads
    _say(f"running {len(plan)} chapters {jobs} at a time ({threads} torch thread(s) each)"
         + (", those that need nothing from the first beside it" if first is not None else ""))
    environ = dict(os.environ)  # read once, here: the first chapter sets its kernel's variables meanwhile
    expected = expected_seconds(reports, profile)
    pending = sorted(plan, key=lambda item: -expected.get(item[0].stem, float("inf")))
    waits = {item[0]: waits_for_first(item[0]) for item in plan}
    state = {"first_running": first is not None, "first_failed": False}
    cond = threading.Condition()
    timings: dict[str, dict[str, Any]] = {}
    errors: list[ReportError] = []

    def take() -> tuple[tuple[Path, dict[str, Any], str], int] | None:
        """The next chapter free to start, and the niceness to start it with."""
        with cond:
            while True:
                if state["first_failed"]:
                    pending[:] = [item for item in pending if not waits[item[0]]]
                free = [item for item in pending if not (state["first_running"] and waits[item[0]])]
                if free:
                    pending.remove(free[0])
                    return free[0], BESIDE_FIRST_NICE if state["first_running"] else 0
                if not pending:
                    return None
                cond.wait()

    def lane() -> None:
        while (taken := take()) is not None:
            (notebook, parameters, digest), nice = taken
            try:
                timing = _run_lane(notebook, parameters, profile, reports, digest, threads, nice, environ)
            except ReportError as err:
                with cond:
                    errors.append(err)
                continue
            with cond:
                timings[notebook.stem] = timing
            _say(f"executed: {notebook.stem} in {timing['wall_s']:.1f} s{cpu_text(timing)} (in a lane, "
                 f"{timing['cache']} data cache)")

    others = [threading.Thread(target=lane, daemon=True) for _ in range(jobs - 1 if first is not None else jobs)]
    for thread in others:
        thread.start()
    first_error: ReportError | None = None
    if first is not None:
        succeeded = False
        try:
            with environment(lane_thread_environment(threads)):  # no chapter oversubscribes the cores
                first()
            succeeded = True
        except ReportError as err:
            first_error = err
        finally:  # interrupted or failed: the chapters waiting for it never start
            with cond:
                state["first_running"], state["first_failed"] = False, not succeeded
                cond.notify_all()
        lane()  # this thread becomes the last lane
    for thread in others:
        thread.join()
    if first_error is not None:
        raise first_error
    if len(errors) == 1:
        raise errors[0]
    if errors:  # every failing chapter named, the first one's output shown
        names = ", ".join(str(e).split(" failed", 1)[0].removeprefix("notebook ") for e in errors)
        raise ReportError(f"{len(errors)} chapters failed in their lanes ({names}); the first:\n{errors[0]}")
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """One lane: execute the notebook a spec file names, stamp it and write its timing record."""
    from mergelab.startup import skip_iri_grammar

    from .runner import execute_and_record

    skip_iri_grammar()  # 2.5 s of start-up per lane that papermill's nbformat never uses (mergelab.startup)

    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    if spec.get("nice"):
        os.nice(int(spec["nice"]))  # the kernel it starts gets it too (runner.keep_niceness)
    execute_and_record(Path(spec["notebook"]), spec["parameters"], spec["profile"], Path(spec["reports"]),
                       spec["digest"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
