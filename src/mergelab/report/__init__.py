"""Execute the notebooks with papermill and build the report book.

``python -m mergelab.report [--profile smoke|tiny|tiny_full|clip|clip_smoke] [--reports DIR] [--notebooks NAME ...]
[--force] [--executor local|ray] [--jobs N|auto] [--renderer auto|quarto|pandoc]`` runs every ``notebooks/NN_topic.ipynb`` (or the named ones) with the parameters in
``params/<profile>/<notebook>.yaml``, writes the executed copies to ``<reports>/``, and renders the
book into ``<reports>/_book/``: with Quarto when it is on ``PATH`` or in the venv, else an HTML book made with pandoc
(from the ``pypandoc-binary`` wheel; :mod:`mergelab.report.pandoc_book`).

A notebook is executed again only when its content hash changed: the notebook, its parameter file,
the profile's ``_benchmark.yaml`` (and those of the profiles it extends), the profile, and the package's
code and shipped data (every ``src/mergelab/**`` file ending in ``.py``, ``.safetensors``, ``.json`` or ``.lua``), and
the inputs the environment names (:func:`mergelab.report.stamps.environment_inputs`: ``MERGELAB_CLIP_DATA_ROOT``,
the files under ``MERGELAB_CLIP_EXPERTS_DIR``, ``MERGELAB_PRETRAIN``, ``MERGELAB_FINETUNE``). The hash of the last successful run is kept in
``<reports>/.stamps/<notebook>.<profile>.sha256``; ``--force`` ignores it.

The book's chapters come from ``book.chapters`` in ``reports/_quarto.yml``, for both renderers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from mergelab import paths
from mergelab.executors import EXECUTORS
from mergelab.params import (BENCHMARK_PARAMS, ReportError, benchmark_param_files, load_params,  # noqa: F401
                             params_path, profile_params)
from mergelab.utils import atomic_write_text

from .book import missing_chapters, quarto_executable, render_book  # noqa: F401
from .runner import (EXECUTED, PANDOC_NOTE, PROJECT_FILES, RENDERERS, UNIX_SOCKET_PATH_MAX,  # noqa: F401
                     UP_TO_DATE, ReportResult, book_chapters, check_chapters, check_kernel, content_hash,
                     default_quarto_yml, discover_notebooks, execute_notebook, is_up_to_date,
                     kernel_environment, kernel_manager_class, run_notebooks, stamp_path, write_stamp)


# --- the command -------------------------------------------------------------------------------


def build_report(
    profile: str = "tiny",
    reports: Path | None = None,
    names: Sequence[str] | None = None,
    force: bool = False,
    notebooks_dir: Path | None = None,
    params_dir: Path | None = None,
    quarto_yml: Path | None = None,
    source_dir: Path | None = None,
    renderer: str = "auto",
    executor: str | None = None,
    jobs: int | str | None = "auto",
) -> ReportResult:
    """Execute the notebooks that changed, then render the book; see the module docstring.

    Every location defaults to the project's (:mod:`mergelab.paths`); tests pass their own.
    ``executor`` (``"local"`` or ``"ray"``) overrides the ``executor`` parameter of every chapter
    that has one (where its sweeps run; ``None``: each parameter file's value). ``jobs``: chapters
    executed at a time, the first included, with the chapters that need nothing from it beside it
    (:mod:`mergelab.report.lanes`; ``"auto"``: one per core, at most 4).
    """
    paths.absolute_dir_variables()  # the chapters' kernels run elsewhere: a relative cache folder must name the same one
    reports = (Path(reports) if reports is not None else paths.reports_dir()).resolve()
    blocked = next((p for p in (reports, *reports.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ReportError(f"reports={str(reports)!r} is not a folder that can be made: {blocked} is a file. "
                          "Give --reports (REPORTS=) a folder, new or existing.")
    reports.mkdir(parents=True, exist_ok=True)
    with reports_lock(reports):
        return _build_report(profile, reports, names, force, notebooks_dir, params_dir, quarto_yml, source_dir,
                             renderer, executor, jobs)


LOCK_FILE = ".report.lock"
"""The lock of a reports folder (``filelock``): one ``make report`` at a time per folder."""


@contextlib.contextmanager
def reports_lock(reports: Path) -> Iterator[None]:
    """Hold the reports folder's lock; a second run on the same folder says who holds it and waits, then
    finds the chapters the first one executed up to date instead of executing them again."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(reports / LOCK_FILE))
    holder = reports / (LOCK_FILE + ".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        for _ in range(20):  # the holder writes who it is right after taking the lock
            if holder.is_file():
                break
            time.sleep(0.1)
        who = f" ({holder.read_text(encoding='utf-8').strip()})" if holder.is_file() else ""
        print(f"{reports} is being built by another `make report` run{who}; waiting for it to finish "
              "(Ctrl-C to stop waiting).", flush=True)
        lock.acquire()
    try:
        # whole or absent: a run waiting on the lock reads it to say who holds it
        atomic_write_text(holder, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _build_report(profile: str, reports: Path, names: Sequence[str] | None, force: bool, notebooks_dir: Path | None,
                  params_dir: Path | None, quarto_yml: Path | None, source_dir: Path | None, renderer: str,
                  executor: str | None = None, jobs: int | str | None = "auto") -> ReportResult:
    quarto_yml = Path(quarto_yml) if quarto_yml is not None else default_quarto_yml()
    chapters = book_chapters(quarto_yml)
    every = discover_notebooks(notebooks_dir)
    check_chapters(every, chapters, quarto_yml)
    selected = discover_notebooks(notebooks_dir, names)
    statuses = run_notebooks(selected, profile, reports, params_dir, source_dir, force, executor, jobs,
                             book_size=len(every))
    missing = [c for c in missing_chapters(reports, chapters) if c.endswith(".ipynb")]
    if names and missing:
        # A subset was asked for: its notebooks ran; the book needs every chapter, so it waits.
        print(f"book not rendered: chapter(s) {', '.join(missing)} not executed yet in {reports}; "
              "run `make report` without NOTEBOOKS to execute them (up-to-date ones are skipped) and render the book.")
        return ReportResult(statuses=statuses, book=None, renderer=None, missing=missing)
    index, used = render_book(reports, quarto_yml, renderer)
    print(f"renderer: {PANDOC_NOTE if used == 'pandoc' else used}")
    print(f"book: {index}")
    return ReportResult(statuses=statuses, book=index, renderer=used)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m mergelab.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m mergelab.report",
        description="Execute the notebooks that changed (papermill) and render the report book.",
    )
    parser.add_argument(
        "--profile", default="tiny", help=f"parameter profile: {', '.join(paths.PROFILES)} (default: tiny)"
    )
    parser.add_argument("--reports", type=Path, default=None, help="output folder (default: reports/)")
    parser.add_argument(
        "--notebooks", nargs="+", metavar="NAME", default=None, help="run only these notebooks"
    )
    parser.add_argument("--force", action="store_true", help="execute even the notebooks that are up to date")
    parser.add_argument("--renderer", choices=RENDERERS, default="auto", help="book renderer (default: auto)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None,
                        help="where the chapters' sweeps run, for every chapter that sweeps: local (this machine) or "
                             "ray (a Ray cluster; docs/distributed.md); default: each parameter file's `executor`")
    parser.add_argument("--jobs", type=_jobs, default="auto",
                        help="chapters executed at a time: a number or auto (one per core, at most 4; default); "
                             "chapter 00 first, beside it those that need nothing from it")
    return parser.parse_args(argv)


def _jobs(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"jobs={value!r} is not valid; use a positive integer or auto.")
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 with a message on a :class:`ReportError`)."""
    from mergelab.startup import skip_iri_grammar

    skip_iri_grammar()  # 2.5 s of start-up the runner never uses (mergelab.startup)
    args = parse_args(argv)
    try:
        build_report(args.profile, args.reports, args.notebooks, args.force, renderer=args.renderer,
                     executor=args.executor, jobs=args.jobs)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # papermill's cell task may still hold the kernel's death (its kernel was stopped on purpose);
        # asyncio would log it as "Task exception was never retrieved" with a traceback at exit
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        print("\ninterrupted: chapters already executed are kept, the one running left nothing behind; "
              "run the same command again to continue.", file=sys.stderr)
        return 130
    return 0

