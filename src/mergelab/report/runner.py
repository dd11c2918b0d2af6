"""The report runner: which notebooks to run, whether they are up to date (content hashes and stamps),
and executing them with papermill on the project's kernel."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab import paths
from mergelab.executors import EXECUTORS
from mergelab.utils import atomic_write, environment
from mergelab.params import (ReportError, benchmark_param_files, check_parameters, load_params, notebook_parameters,
                             params_path)

from .stamps import (  # noqa: F401  (re-exported: the report's public names)
    STAMPS_DIR, PACKAGE_FILES, clear_stamps, content_hash, is_up_to_date, package_dir, stamp_path, write_stamp)

RENDERERS = ("auto", "quarto", "pandoc")
"""``auto``: Quarto when it is on ``PATH``, else pandoc (from the ``pypandoc-binary`` wheel)."""

BOOK_DIR = "_book"
PROJECT_FILES = ("_quarto.yml", "index.qmd", "references.bib")
"""Files of the Quarto project copied next to the executed notebooks when ``--reports`` is elsewhere."""

PANDOC_NOTE = (
    "pandoc (Quarto not found on PATH; for the Quarto book run `make quarto`, which tries "
    "`pip install quarto-cli` into the venv (it downloads Quarto from the web), or install Quarto from "
    "https://quarto.org or conda-forge (`conda install -c conda-forge quarto`))"
)
EXECUTED = "executed"
UP_TO_DATE = "up to date"

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<title>.+?)\s*(?:\{[^}]*\})?\s*#*\s*$", re.MULTILINE)
_FRONT_MATTER = re.compile(r"\A---\s*\n(?P<yaml>.*?)\n(?:---|\.\.\.)\s*(?:\n|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` did.

    Attributes:
        statuses: notebook name (without ``.ipynb``) -> ``"executed"`` or ``"up to date"``.
        book: the book's ``index.html``; ``None`` when only some notebooks were asked for and the
            folder lacks other chapters, so no book was rendered.
        renderer: ``"quarto"`` or ``"pandoc"``; ``None`` when no book was rendered.
        missing: chapters (file names) missing from the folder when the book was not rendered.
    """

    statuses: dict[str, str]
    book: Path | None
    renderer: str | None
    missing: list[str] = field(default_factory=list)


# --- what to run -------------------------------------------------------------------------------


def discover_notebooks(notebooks_dir: Path | None = None, names: Sequence[str] | None = None) -> list[Path]:
    """The notebooks to run, in sorted order.

    Args:
        notebooks_dir: folder of ``NN_topic.ipynb`` files (default :func:`mergelab.paths.notebooks_dir`).
        names: run only these; ``"00_x"``, ``"00_x.ipynb"`` and ``"notebooks/00_x.ipynb"`` all work.
    """
    folder = Path(notebooks_dir) if notebooks_dir is not None else paths.notebooks_dir()
    found = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if not found:
        raise ReportError(f"no notebooks found in {folder}: expected files like 00_topic.ipynb.")
    if not names:
        return found
    by_stem = {p.stem: p for p in found}
    wanted = {Path(name).name.removesuffix(".ipynb") for name in names}
    unknown = sorted(wanted - by_stem.keys())
    if unknown:
        raise ReportError(
            f"--notebooks {' '.join(unknown)}: no such notebook in {folder}; valid: {', '.join(by_stem)}."
        )
    return [p for p in found if p.stem in wanted]


def default_quarto_yml() -> Path:
    """The book's project file, ``<root>/reports/_quarto.yml``: the single source of the chapter list."""
    return paths.project_root() / "reports" / "_quarto.yml"


def book_chapters(quarto_yml: Path | None = None) -> list[str]:
    """Chapter files of the book, in order, from ``book.chapters`` (and ``book.appendices``).

    Parts (``- part: ...`` with nested ``chapters``) are flattened.
    """
    quarto_yml = Path(quarto_yml) if quarto_yml is not None else default_quarto_yml()
    if not quarto_yml.is_file():
        raise ReportError(f"the book's project file {quarto_yml} does not exist.")
    config = yaml.safe_load(quarto_yml.read_text(encoding="utf-8")) or {}
    book = config.get("book") or {}
    chapters = _flatten_chapters(book.get("chapters") or []) + _flatten_chapters(book.get("appendices") or [])
    if not chapters:
        raise ReportError(f"{quarto_yml} lists no chapters: add them under book.chapters.")
    return chapters


def _flatten_chapters(entries: Sequence[Any]) -> list[str]:
    flat: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            flat.append(entry)
        elif isinstance(entry, dict):
            if isinstance(entry.get("part"), str) and entry["part"].endswith((".qmd", ".md", ".ipynb")):
                flat.append(entry["part"])
            if entry.get("href") or entry.get("file"):
                flat.append(entry.get("href") or entry["file"])
            flat.extend(_flatten_chapters(entry.get("chapters") or []))
    return flat


def check_chapters(notebooks: Sequence[Path], chapters: Sequence[str], quarto_yml: Path) -> None:
    """Refuse a notebook that is not a chapter, and a notebook chapter that has no notebook."""
    names = {nb.name for nb in notebooks}
    missing = [name for name in sorted(names) if name not in chapters]
    if missing:
        lines = "\n".join(f"    - {name}" for name in missing)
        raise ReportError(
            f"notebook(s) {', '.join(missing)} are not chapters of the book: add them to book.chapters "
            f"in {quarto_yml}:\n{lines}"
        )
    orphans = [c for c in chapters if c.endswith(".ipynb") and c not in names]
    if orphans:
        folder = notebooks[0].parent if notebooks else "notebooks/"
        raise ReportError(
            f"{quarto_yml} lists chapter(s) {', '.join(orphans)} but there is no such notebook in "
            f"{folder}: remove them from book.chapters or add the notebook."
        )


# --- running -----------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_environment(reports: Path, extra: dict[str, str] | None = None) -> Iterator[None]:
    """Point the kernel's ``mergelab.paths`` at ``reports`` (the kernel inherits ``os.environ``), with
    ``extra`` variables set too."""
    values = {
        "MERGELAB_REPORTS_DIR": str(reports),
        "MERGELAB_RESULTS_DIR": str(Path(reports) / "results"),
        "JUPYTER_PREFER_ENV_PATH": os.environ.get("JUPYTER_PREFER_ENV_PATH", "1"),
        **(extra or {}),
    }
    with environment(values):
        yield


def check_kernel(kernel_name: str = paths.KERNEL_NAME) -> None:
    """Fail early, with the fix, when the project's Jupyter kernel is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as err:
        raise ReportError(
            f"the Jupyter kernel {kernel_name!r} is not installed: run `make env`, or "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name} "
            f'--display-name "Python (mergelab)"`.'
        ) from err


UNIX_SOCKET_PATH_MAX = 100
"""Longest socket path we hand the kernel (Linux allows 107 bytes, macOS 103)."""


def kernel_manager_class() -> type | None:
    """The kernel manager papermill starts each notebook's kernel with (``None``: nbclient's default).

    By default jupyter_client talks to a kernel over TCP on ``127.0.0.1``, unencrypted, so any
    local user could connect to it, and ipykernel warns about it at every start ("Kernel is running
    over TCP without encryption"). On POSIX systems the kernel's sockets are made Unix domain sockets
    instead (jupyter_client's ``ipc`` transport), named after the kernel's connection file in
    Jupyter's runtime directory, which only the user can enter (``kernel-<uuid>-ipc-<n>``); they are
    removed when the kernel shuts down. Where that is not possible (Windows, or a runtime directory
    whose path is too long for a socket name, see :data:`UNIX_SOCKET_PATH_MAX`) it is ``None`` and
    the default TCP transport is used.
    """
    if os.name != "posix":
        return None
    from jupyter_core.paths import jupyter_runtime_dir

    longest = os.path.join(jupyter_runtime_dir(), f"kernel-{uuid.UUID(int=0)}-ipc-99")
    if len(os.fsencode(longest)) > UNIX_SOCKET_PATH_MAX:
        return None
    return _ipc_kernel_manager()


KERNEL_LOG_ENV = "MERGELAB_KERNEL_LOG"
"""Where a notebook run's kernel writes its stderr (set by :func:`execute_notebook`)."""

_KERNEL_MANAGERS: weakref.WeakSet = weakref.WeakSet()
"""Kernel managers of this process's notebook runs (see :func:`_stop_kernels`)."""


def _stop_kernels() -> None:
    """Kill the kernels this process started and remove their connection files and sockets (after
    Ctrl-C, when papermill had no chance to shut them down)."""
    for km in list(_KERNEL_MANAGERS):
        process = getattr(getattr(km, "provisioner", None), "process", None)
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
                process.wait(timeout=10)
        for cleanup in (km.cleanup_connection_file, km.cleanup_ipc_files):
            with contextlib.suppress(Exception):
                cleanup()


def keep_niceness(pid: int) -> bool:
    """Give the process ``pid`` (a kernel this process launched) this process's niceness where Linux
    would drop it. A kernel starts a session of its own, and with autogroups (``sched_autogroup_enabled``)
    a session is scheduled as one group at nice 0 against the others, whatever its processes' niceness:
    a chapter started at low priority (:data:`mergelab.report.lanes.BESIDE_FIRST_NICE`) would otherwise
    take half the cores from the chapter it should leave them to. Returns whether a niceness was set."""
    nice = os.nice(0)
    autogroup = Path(f"/proc/{pid}/autogroup")
    if nice <= 0 or not autogroup.exists():
        return False
    try:
        autogroup.write_text(str(nice))
    except OSError:  # not Linux's autogroups, or not allowed: the process keeps its own niceness
        return False
    return True


@functools.lru_cache(maxsize=1)
def _ipc_kernel_manager() -> type:
    from jupyter_client.manager import AsyncKernelManager  # nbclient's default kernel manager
    from jupyter_core.paths import jupyter_runtime_dir
    from jupyter_core.utils import ensure_dir_exists
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        """nbclient's kernel manager with the ``ipc`` transport (Unix domain sockets).

        Its connection file, and so its sockets, are in Jupyter's runtime directory (jupyter_client
        would otherwise put the sockets in the working directory, i.e. next to the notebooks).
        Each instance is remembered (weakly) so that an interrupted run can stop its kernel and
        remove its files (:func:`_stop_kernels`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _KERNEL_MANAGERS.add(self)

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            # The kernel's own stderr (its log: warnings, and the tracebacks it logs when a run is
            # interrupted) goes to a file next to the executed notebook, not into the terminal.
            log = os.environ.get(KERNEL_LOG_ENV)
            if log and "stderr" not in kw:
                kw["stderr"] = open(log, "ab")  # noqa: SIM115 - the kernel process holds it
            launched = await super()._async_launch_kernel(kernel_cmd, **kw)
            process = getattr(getattr(self, "provisioner", None), "process", None)
            if process is not None:
                keep_niceness(process.pid)
            return launched

        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("connection_file")
        def _connection_file_default(self) -> str:
            runtime = jupyter_runtime_dir()
            ensure_dir_exists(runtime, 0o700)
            return os.path.join(runtime, f"kernel-{uuid.uuid4()}.json")

    return IPCKernelManager


def execute_notebook(
    notebook: Path, parameters: dict[str, Any], reports: Path, kernel_name: str = paths.KERNEL_NAME
) -> float:
    """Execute ``notebook`` with papermill into ``<reports>/<name>.ipynb``; return the wall time in s.

    The run writes a hidden temporary file in ``reports`` and moves it into place only on success.
    On failure the partly executed notebook is kept as ``<reports>/<name>.failed.ipynb`` and a
    :class:`ReportError` names the notebook. A chapter writes its results file (``<reports>/results/<name>.json``)
    before its last cells run: when the run fails or is interrupted, the results file the previous executed notebook
    goes with is put back (or, with none, the new one removed), so that the book and its claims page never read
    numbers from another run than the chapter they render.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    reports = Path(reports)
    running = reports / f".{notebook.stem}.running.ipynb"
    failed = reports / f"{notebook.stem}.failed.ipynb"
    manager = kernel_manager_class()
    kernel_options = {"kernel_manager_class": manager} if manager is not None else {}
    start = time.perf_counter()
    kernel_log = reports / f".{notebook.stem}.kernel.log"
    kernel_log.unlink(missing_ok=True)
    with kernel_environment(reports, {KERNEL_LOG_ENV: str(kernel_log)}):
        check_kernel(kernel_name)
        results = _ResultsGuard(reports / "results" / f"{notebook.stem}.json")
        try:
            papermill.execute_notebook(
                str(notebook),
                str(running),
                parameters=parameters,
                kernel_name=kernel_name,
                language="python",  # the project's kernel; notebooks without language_info still run
                cwd=str(notebook.parent),
                progress_bar=True,
                **kernel_options,
            )
        except PapermillExecutionError as err:
            _keep_failed(running, failed)
            results.restore()
            raise ReportError(
                f"notebook {notebook.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"The partly executed notebook is kept at {failed} for inspection{_log_note(kernel_log)}."
            ) from err
        except Exception as err:
            _keep_failed(running, failed)
            results.restore()
            raise ReportError(f"notebook {notebook.name} could not be executed: {err}{_log_note(kernel_log)}") from err
        except BaseException:  # interrupted: leave nothing half written behind, and no kernel
            running.unlink(missing_ok=True)
            _stop_kernels()  # before the results go back: a kernel still in a cell could write them again
            results.restore()
            kernel_log.unlink(missing_ok=True)
            raise
    os.replace(running, reports / notebook.name)
    results.release()
    failed.unlink(missing_ok=True)
    kernel_log.unlink(missing_ok=True)
    return time.perf_counter() - start


class _ResultsGuard:
    """A copy of a chapter's results file taken before the chapter runs (``.<name>.previous.json`` beside it), to
    put back with :meth:`restore` when the run fails, or drop with :meth:`release` when it succeeds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = path.with_name(f".{path.stem}.previous.json")
        self.previous.unlink(missing_ok=True)
        self.had = path.is_file()
        if self.had:
            atomic_write(self.previous, lambda tmp: shutil.copyfile(path, tmp))

    def restore(self) -> None:
        """The results file as it was before the run (none if there was none)."""
        if self.had:
            os.replace(self.previous, self.path)
        else:
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.previous.unlink(missing_ok=True)


def _log_note(kernel_log: Path) -> str:
    """Where the kernel's log is, when it wrote one."""
    return f"; the kernel's log is {kernel_log}" if kernel_log.is_file() and kernel_log.stat().st_size else ""


def _keep_failed(running: Path, failed: Path) -> None:
    if running.exists():
        os.replace(running, failed)


def run_notebooks(
    notebooks: Sequence[Path],
    profile: str,
    reports: Path,
    params_dir: Path | None = None,
    source_dir: Path | None = None,
    force: bool = False,
    executor: str | None = None,
    jobs: int | str | None = 1,
    book_size: int | None = None,
) -> dict[str, str]:
    """Execute each notebook whose content hash changed (all of them with ``force``); with ``jobs`` above
    1 (or ``"auto"``), that many at a time: the first one here, those that need nothing from it beside it,
    the others once it is done (:mod:`mergelab.report.lanes`).

    Every chapter runs at one torch thread count, the cores shared among the lanes a build of ``book_size``
    chapters (the whole book; ``None``: the ``notebooks`` given) would use, whatever is out of date or
    selected: a chapter run again alone gives the bits of the full build.

    Every parameter file is read before anything runs, so a missing one fails fast. ``executor``
    (``"local"`` or ``"ray"``) replaces the ``executor`` parameter of the notebooks that have one; it
    does not enter the content hash (an executor changes where runs train, not their results).
    Returns notebook name -> ``"executed"`` or ``"up to date"``.
    """
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    plan = []
    for notebook in notebooks:
        params = params_path(profile, notebook.stem, params_dir)
        values = load_params(params, profile, notebook.stem)
        if executor is not None and "executor" in notebook_parameters(notebook):
            if executor not in EXECUTORS:
                raise ReportError(f"executor={executor!r} is not valid; use one of {', '.join(EXECUTORS)}.")
            values = {**values, "executor": executor}
        sources = " + ".join(str(f) for f in [*benchmark_param_files(params.parent), params])
        check_parameters(notebook, values, sources)
        plan.append((notebook, params, values))
    statuses: dict[str, str] = {}
    todo = []
    for notebook, params, parameters in plan:
        digest = content_hash(notebook, params, profile, source_dir)
        if not force and is_up_to_date(reports, notebook.stem, profile, digest):
            print(f"up to date: {notebook.stem}")
            statuses[notebook.stem] = UP_TO_DATE
        else:
            todo.append((notebook, parameters, digest))
    from .lanes import lane_thread_environment, lane_threads, resolve_jobs, run_in_lanes

    lanes = resolve_jobs(jobs, max(1, len(todo)))  # checked even when nothing runs
    # One thread count for every chapter, whatever is out of date or selected: a chapter run again alone
    # (after an edit) gets the threads it had in the full build, so reductions across threads give the same bits.
    threads = lane_threads(resolve_jobs(jobs, max(1, book_size or len(plan))))

    def here(notebook: Path, parameters: dict[str, Any], digest: str) -> None:
        from .timings import cpu_text

        print(f"executing: {notebook.stem} (profile {profile})")
        timing = execute_and_record(notebook, parameters, profile, reports, digest)
        print(f"executed: {notebook.stem} in {timing['wall_s']:.1f} s{cpu_text(timing)} ({timing['cache']} data "
              f"cache, load {timing['load_average_start'][0] if timing['load_average_start'] else '?'})")
        statuses[notebook.stem] = EXECUTED

    if lanes == 1:
        with environment(lane_thread_environment(threads)):
            for item in todo:
                here(*item)
    elif todo:  # the first chapter here, building what the others read; beside it those that need none of it
        run_in_lanes(todo[1:], profile, reports, lanes, first=lambda: here(*todo[0]), threads=threads)
        statuses.update({notebook.stem: EXECUTED for notebook, _, _ in todo[1:]})
    return statuses


def execute_and_record(notebook: Path, parameters: dict[str, Any], profile: str, reports: Path, digest: str
                       ) -> dict[str, Any]:
    """Execute one notebook (:func:`execute_notebook`), then write its stamp and timing record; return the record."""
    from .timings import Stopwatch, write_timing

    clear_stamps(reports, notebook.stem)  # up to date again only once this run succeeds
    with Stopwatch() as watch:
        execute_notebook(notebook, parameters, reports)
    write_stamp(reports, notebook.stem, profile, digest)
    timing = watch.record(notebook.stem, profile)
    write_timing(reports, timing)
    return timing


