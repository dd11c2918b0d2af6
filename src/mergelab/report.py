"""Execute the notebooks with papermill and build the report book.

``python -m mergelab.report [--profile smoke|tiny|clip] [--reports DIR] [--notebooks NAME ...]
[--force]`` runs every ``notebooks/NN_topic.ipynb`` (or the named ones) with the parameters in
``params/<profile>/<notebook>.yaml``, writes the executed copies to ``<reports>/``, and renders the
book into ``<reports>/_book/``: with Quarto when it is on ``PATH``, else a plain HTML book made with
nbconvert.

A notebook is executed again only when its content hash changed: the notebook, its parameter file,
the profile and every ``src/mergelab/**/*.py``. The hash of the last successful run is kept in
``<reports>/.stamps/<notebook>.<profile>.sha256``; ``--force`` ignores it.

The book's chapters come from ``book.chapters`` in ``reports/_quarto.yml``, for both renderers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab import paths
from mergelab.params import (BENCHMARK_PARAMS, ReportError, benchmark_param_files, load_params,  # noqa: F401
                             params_path, profile_params)

RENDERERS = ("auto", "quarto", "nbconvert")
"""``auto``: Quarto when it is on ``PATH``, else nbconvert."""

BOOK_DIR = "_book"
STAMPS_DIR = ".stamps"
PROJECT_FILES = ("_quarto.yml", "index.qmd", "references.bib")
"""Files of the Quarto project copied next to the executed notebooks when ``--reports`` is elsewhere."""

NBCONVERT_NOTE = (
    "nbconvert (quarto not found on PATH; install it from conda-forge or `pip install quarto-cli` "
    "for the full Quarto book)"
)
EXECUTED = "executed"
UP_TO_DATE = "up to date"

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<title>.+?)\s*(?:\{[^}]*\})?\s*#*\s*$", re.MULTILINE)
_HEADING_ATTRIBUTES = re.compile(r"^(\s{0,3}#{1,6}\s.*?)\s*\{[^}]*\}\s*$", re.MULTILINE)
_FRONT_MATTER = re.compile(r"\A---\s*\n(?P<yaml>.*?)\n(?:---|\.\.\.)\s*(?:\n|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` did.

    Attributes:
        statuses: notebook name (without ``.ipynb``) -> ``"executed"`` or ``"up to date"``.
        book: the book's ``index.html``; ``None`` when only some notebooks were asked for and the
            folder lacks other chapters, so no book was rendered.
        renderer: ``"quarto"`` or ``"nbconvert"``; ``None`` when no book was rendered.
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


# --- when to run -------------------------------------------------------------------------------


def package_dir() -> Path:
    """The ``mergelab`` package's source folder, whose ``*.py`` files are part of every content hash."""
    return Path(paths.__file__).resolve().parent


def content_hash(notebook: Path, params: Path, profile: str, source_dir: Path | None = None) -> str:
    """SHA-256 of the notebook, its parameter files (the chapter's and the profile's benchmark block),
    the profile and every ``*.py`` under ``source_dir``.

    ``source_dir`` defaults to the installed package (``src/mergelab``); files are hashed in sorted
    order with their relative paths, so renaming a module changes the hash too.
    """
    source_dir = Path(source_dir) if source_dir is not None else package_dir()
    digest = hashlib.sha256()
    for label, data in (
        ("notebook", Path(notebook).read_bytes()),
        ("params", Path(params).read_bytes()),
        *(("benchmark params", f.read_bytes()) for f in benchmark_param_files(Path(params).parent)),
        ("profile", profile.encode()),
    ):
        digest.update(f"{label}\0{len(data)}\0".encode() + data)
    for source in sorted(source_dir.rglob("*.py")):
        data = source.read_bytes()
        digest.update(f"src\0{source.relative_to(source_dir).as_posix()}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def stamp_path(reports: Path, notebook: str, profile: str) -> Path:
    """``<reports>/.stamps/<notebook>.<profile>.sha256``."""
    return Path(reports) / STAMPS_DIR / f"{notebook}.{profile}.sha256"


def is_up_to_date(reports: Path, notebook: str, profile: str, digest: str) -> bool:
    """True when the executed notebook exists and the stamp of its last run holds ``digest``."""
    stamp = stamp_path(reports, notebook, profile)
    if not (Path(reports) / f"{notebook}.ipynb").is_file() or not stamp.is_file():
        return False
    return stamp.read_text(encoding="utf-8").strip() == digest


def write_stamp(reports: Path, notebook: str, profile: str, digest: str) -> Path:
    """Record a successful run; stamps of other profiles go, since the executed copy is now this one."""
    stamp = stamp_path(reports, notebook, profile)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    for old in stamp.parent.glob(f"{notebook}.*.sha256"):
        if "." not in old.name[len(notebook) + 1 : -len(".sha256")]:
            old.unlink()
    tmp = stamp.with_name(f".{stamp.name}.tmp")
    tmp.write_text(digest + "\n", encoding="utf-8")
    os.replace(tmp, stamp)
    return stamp


# --- running -----------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_environment(reports: Path) -> Iterator[None]:
    """Point the kernel's ``mergelab.paths`` at ``reports`` (the kernel inherits ``os.environ``)."""
    values = {
        "MERGELAB_REPORTS_DIR": str(reports),
        "MERGELAB_RESULTS_DIR": str(Path(reports) / "results"),
        "JUPYTER_PREFER_ENV_PATH": os.environ.get("JUPYTER_PREFER_ENV_PATH", "1"),
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


@functools.lru_cache(maxsize=1)
def _ipc_kernel_manager() -> type:
    from jupyter_client.manager import AsyncKernelManager  # nbclient's default kernel manager
    from jupyter_core.paths import jupyter_runtime_dir
    from jupyter_core.utils import ensure_dir_exists
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        """nbclient's kernel manager with the ``ipc`` transport (Unix domain sockets).

        Its connection file, and so its sockets, are in Jupyter's runtime directory (jupyter_client
        would otherwise put the sockets in the working directory, i.e. next to the notebooks)."""

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
    :class:`ReportError` names the notebook.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    reports = Path(reports)
    running = reports / f".{notebook.stem}.running.ipynb"
    failed = reports / f"{notebook.stem}.failed.ipynb"
    manager = kernel_manager_class()
    kernel_options = {"kernel_manager_class": manager} if manager is not None else {}
    start = time.perf_counter()
    with kernel_environment(reports):
        check_kernel(kernel_name)
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
            raise ReportError(
                f"notebook {notebook.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"The partly executed notebook is kept at {failed} for inspection."
            ) from err
        except Exception as err:
            _keep_failed(running, failed)
            raise ReportError(f"notebook {notebook.name} could not be executed: {err}") from err
        except BaseException:  # interrupted: leave nothing half written behind
            running.unlink(missing_ok=True)
            raise
    os.replace(running, reports / notebook.name)
    failed.unlink(missing_ok=True)
    return time.perf_counter() - start


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
) -> dict[str, str]:
    """Execute each notebook whose content hash changed (all of them with ``force``).

    Every parameter file is read before anything runs, so a missing one fails fast.
    Returns notebook name -> ``"executed"`` or ``"up to date"``.
    """
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    plan = []
    for notebook in notebooks:
        params = params_path(profile, notebook.stem, params_dir)
        plan.append((notebook, params, load_params(params, profile, notebook.stem)))
    statuses: dict[str, str] = {}
    for notebook, params, parameters in plan:
        digest = content_hash(notebook, params, profile, source_dir)
        if not force and is_up_to_date(reports, notebook.stem, profile, digest):
            print(f"up to date: {notebook.stem}")
            statuses[notebook.stem] = UP_TO_DATE
            continue
        print(f"executing: {notebook.stem} (profile {profile})")
        seconds = execute_notebook(notebook, parameters, reports)
        write_stamp(reports, notebook.stem, profile, digest)
        print(f"executed: {notebook.stem} in {seconds:.1f} s")
        statuses[notebook.stem] = EXECUTED
    return statuses


# --- the book ----------------------------------------------------------------------------------


def sync_project_files(quarto_yml: Path, reports: Path, chapters: Sequence[str] = ()) -> None:
    """Copy the Quarto project (``_quarto.yml``, ``index.qmd``, ``references.bib`` and any other
    non-notebook chapter) into ``reports`` when the book is built outside the project's folder."""
    source = Path(quarto_yml).resolve().parent
    reports = Path(reports).resolve()
    if source == reports:
        return
    shutil.copy2(quarto_yml, reports / "_quarto.yml")
    extra = [c for c in chapters if not c.endswith(".ipynb")]
    for name in dict.fromkeys([*PROJECT_FILES[1:], *extra]):
        if (source / name).is_file():
            (reports / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, reports / name)


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(front matter as a dict, the Markdown after it)`` of a ``.qmd`` file."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group("yaml")) or {}
    return (meta if isinstance(meta, dict) else {}), text[match.end() :]


def notebook_title(notebook: Path) -> str:
    """The first Markdown heading of a notebook, else its file name."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = _HEADING.search(cell.source)
            if match:
                return match.group("title")
    return notebook.stem


def chapter_title(path: Path) -> str:
    """Title of a chapter file: a notebook's first heading, a ``.qmd``'s ``title`` or first heading."""
    if path.suffix == ".ipynb":
        return notebook_title(path)
    meta, body = split_front_matter(path.read_text(encoding="utf-8"))
    if meta.get("title"):
        return str(meta["title"])
    match = _HEADING.search(body)
    return match.group("title") if match else path.stem


def missing_chapters(reports: Path, chapters: Sequence[str]) -> list[str]:
    """Chapters of the book that have no file in ``reports`` yet (notebooks not executed)."""
    return [c for c in chapters if not (Path(reports) / c).is_file()]


def render_book(reports: Path, quarto_yml: Path | None = None, renderer: str = "auto") -> tuple[Path, str]:
    """Render the book of ``reports``; return ``(path of index.html, renderer used)``.

    Args:
        reports: folder with the executed notebooks.
        quarto_yml: the project file holding ``book.chapters`` (default ``<root>/reports/_quarto.yml``).
        renderer: ``"auto"`` (Quarto if on ``PATH``, else nbconvert), ``"quarto"`` or ``"nbconvert"``.
    """
    if renderer not in RENDERERS:
        raise ReportError(f"renderer={renderer!r} is not valid; use one of {', '.join(RENDERERS)}.")
    reports = Path(reports).resolve()
    quarto_yml = Path(quarto_yml) if quarto_yml is not None else default_quarto_yml()
    chapters = book_chapters(quarto_yml)
    sync_project_files(quarto_yml, reports, chapters)
    missing = missing_chapters(reports, chapters)
    if missing:
        raise ReportError(
            f"the book cannot be rendered: chapter(s) {', '.join(missing)} are missing from {reports}. "
            f"Run `make report` for all notebooks (up-to-date ones are skipped)."
        )
    quarto = shutil.which("quarto")
    if renderer == "quarto" and quarto is None:
        raise ReportError(
            "renderer='quarto' was asked for but quarto is not on PATH; install it or use 'auto'."
        )
    if renderer != "nbconvert" and quarto is not None:
        completed = subprocess.run([quarto, "render", str(reports)], check=False)
        if completed.returncode != 0:
            raise ReportError(
                f"`quarto render {reports}` failed (exit code {completed.returncode}); see its output above."
            )
        return reports / BOOK_DIR / "index.html", "quarto"
    config = yaml.safe_load(quarto_yml.read_text(encoding="utf-8")) or {}
    title = str((config.get("book") or {}).get("title") or "Report")
    return build_html_book(reports, chapters, title, _bibliography(reports, config)), "nbconvert"


def _bibliography(reports: Path, config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Entries of the ``bibliography`` file(s) named in the Quarto configuration."""
    files = config.get("bibliography") or []
    entries: dict[str, dict[str, str]] = {}
    for name in [files] if isinstance(files, str) else files:
        if (reports / name).is_file():
            entries.update(read_bibtex(reports / name))
    return entries


def build_html_book(
    reports: Path, chapters: Sequence[str], title: str, bibliography: dict[str, dict[str, str]] | None = None
) -> Path:
    """A plain HTML book without Quarto: one page per chapter and an ``index.html`` made of the
    first chapter (``index.qmd``) followed by a table of contents. Returns ``index.html``.

    ``[@key]`` citations in ``.qmd`` chapters become author-year links to a reference list when
    ``bibliography`` (from :func:`read_bibtex`) knows the key.
    """
    reports = Path(reports)
    bibliography = bibliography or {}
    book = reports / BOOK_DIR
    book.mkdir(parents=True, exist_ok=True)
    pages = [(c, _html_name(c), chapter_title(reports / c)) for c in chapters]
    for position, (chapter, page, chapter_name) in enumerate(pages):
        if position == 0 and page == "index.html":
            continue
        nav = _nav(pages, position)
        if chapter.endswith(".ipynb"):
            document = _notebook_html(reports / chapter, nav)
        else:
            body, cited = _markdown_html(reports / chapter, bibliography)
            document = _page(chapter_name, nav + body + _references_html(cited, bibliography))
        (book / page).parent.mkdir(parents=True, exist_ok=True)
        (book / page).write_text(document, encoding="utf-8")
    intro, cited = f"<h1>{html.escape(title)}</h1>\n", []
    if pages[0][1] == "index.html":
        meta, _ = split_front_matter((reports / chapters[0]).read_text(encoding="utf-8"))
        if meta.get("subtitle"):
            intro += f"<p><em>{html.escape(str(meta['subtitle']))}</em></p>\n"
        body, cited = _markdown_html(reports / chapters[0], bibliography)
        intro += body
    index = book / "index.html"
    index.write_text(
        _page(title, intro + _toc(pages) + _references_html(cited, bibliography)), encoding="utf-8"
    )
    return index


def _html_name(chapter: str) -> str:
    return Path(chapter).with_suffix(".html").as_posix()


def _markdown_html(path: Path, bibliography: dict[str, dict[str, str]]) -> tuple[str, list[str]]:
    """HTML of a Markdown/Quarto file and the citation keys it cites, in order of first use."""
    import mistune

    _, body = split_front_matter(path.read_text(encoding="utf-8"))
    body, cited = _link_citations(_HEADING_ATTRIBUTES.sub(r"\1", body), bibliography)
    return str(mistune.html(body)), cited


def _notebook_html(notebook: Path, nav: str) -> str:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_filename(str(notebook))
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, body, count=1)


def _nav(pages: Sequence[tuple[str, str, str]], position: int) -> str:
    here = Path(pages[position][1]).parent

    def link(target: int, label: str) -> str:
        href = os.path.relpath(pages[target][1], here).replace(os.sep, "/")
        return f'<a href="{html.escape(href)}">{label} {html.escape(pages[target][2])}</a>'

    parts = [link(0, "&#8962;")]
    if position > 1:
        parts.append(link(position - 1, "&larr;"))
    if position + 1 < len(pages):
        parts.append(link(position + 1, "&rarr;"))
    return '<nav style="padding:.5em 1em;border-bottom:1px solid #ddd">' + " &middot; ".join(parts) + "</nav>"


def _toc(pages: Sequence[tuple[str, str, str]]) -> str:
    items = "".join(
        f'<li><a href="{html.escape(page)}">{html.escape(name)}</a></li>' for _, page, name in pages
    )
    return f'<h2>Chapters</h2>\n<ol class="toc">{items}</ol>\n'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:52em;margin:2em auto;padding:0 1em;"
        "line-height:1.55;color:#212529}code,pre{background:#f6f8fa}pre{padding:.8em;overflow:auto}"
        "a{color:#2780e3}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


# --- citations for the nbconvert book (Quarto does this itself) ----------------------------------

_BIB_ENTRY = re.compile(r"@(?P<kind>\w+)\s*\{\s*(?P<key>[^,\s]+)\s*,")
_BIB_FIELD = re.compile(r"\s*(?P<name>[A-Za-z_-]+)\s*=\s*")
_CITATION_GROUP = re.compile(r"\[(?P<body>-?@[^\[\]]+)\]")
_BARE_CITATION = re.compile(r"(?<![\w@\[])@(?P<key>[\w:.-]*\w)")
_ACCENTS = {"`": "\u0300", "'": "\u0301", "^": "\u0302", "~": "\u0303", '"': "\u0308"}


def read_bibtex(path: Path) -> dict[str, dict[str, str]]:
    """A small BibTeX reader: key -> lower-case field name -> plain text (braces and accents resolved).

    Enough for the reference list of the nbconvert book; Quarto reads the file itself.
    """
    text = Path(path).read_text(encoding="utf-8")
    entries: dict[str, dict[str, str]] = {}
    for match in _BIB_ENTRY.finditer(text):
        if match.group("kind").lower() in ("comment", "string", "preamble"):
            continue
        entries[match.group("key")] = _bib_fields(text, match.end())
    return entries


def _bib_fields(text: str, pos: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        match = _BIB_FIELD.match(text, pos)
        if not match:
            return fields
        pos = match.end()
        if text.startswith("{", pos):
            value, pos = _balanced(text, pos)
        elif text.startswith('"', pos):
            end = text.index('"', pos + 1)
            value, pos = text[pos + 1 : end], end + 1
        else:
            delimiter = re.compile(r"[,}\n]").search(text, pos)
            stop = delimiter.start() if delimiter else len(text)
            value, pos = text[pos:stop].strip(), stop
        fields[match.group("name").lower()] = _latex_to_text(value)
        pos = re.compile(r"\s*,?").match(text, pos).end()  # type: ignore[union-attr]


def _balanced(text: str, start: int) -> tuple[str, int]:
    """The contents of the brace group opening at ``text[start]`` and the index after it."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start + 1 : index], index + 1
    raise ReportError(f"unbalanced braces in a BibTeX entry near: {text[start : start + 60]!r}")


def _latex_to_text(value: str) -> str:
    import unicodedata

    value = re.sub(r"\\([`'^~\"])\{?(\w)\}?", lambda m: m.group(2) + _ACCENTS[m.group(1)], value)
    value = re.sub(r"[{}$]|\^", "", value).replace("``", '"').replace("''", '"').replace("--", "\u2013")
    return unicodedata.normalize("NFC", " ".join(value.split()))


def _author_year(entry: dict[str, str], key: str, narrative: bool = False) -> str:
    """``"Hardt et al. 2016"``, or ``"Hardt et al. (2016)"`` when ``narrative``; without authors, a
    short title."""
    authors = [a.strip() for a in entry.get("author", "").split(" and ") if a.strip()]
    name = authors[0].split(",")[0].strip() if authors else entry.get("title", key).split(":")[0]
    if len(authors) == 2 and authors[1] != "others":
        name += " and " + authors[1].split(",")[0].strip()
    elif len(authors) > 1:
        name += " et al."
    year = entry.get("year", "")
    return (f"{name} ({year})" if narrative else f"{name} {year}") if year else name


def _link_citations(markdown: str, bibliography: dict[str, dict[str, str]]) -> tuple[str, list[str]]:
    """Replace ``[@a; @b]`` and ``@a`` for keys in ``bibliography`` with links; return the keys cited."""
    cited: list[str] = []

    def link(key: str, narrative: bool = False) -> str:
        if key not in cited:
            cited.append(key)
        label = _author_year(bibliography[key], key, narrative)
        return f'<a href="#ref-{html.escape(key)}">{html.escape(label)}</a>'

    def group(match: re.Match[str]) -> str:
        keys = [part.strip().lstrip("-@") for part in match.group("body").split(";")]
        if not keys or any(key not in bibliography for key in keys):
            return match.group(0)
        return "(" + "; ".join(link(key) for key in keys) + ")"

    def bare(match: re.Match[str]) -> str:
        key = match.group("key")
        return link(key, narrative=True) if key in bibliography else match.group(0)

    return _BARE_CITATION.sub(bare, _CITATION_GROUP.sub(group, markdown)), cited


def _references_html(keys: Sequence[str], bibliography: dict[str, dict[str, str]]) -> str:
    if not keys:
        return ""
    items = []
    for key in keys:
        entry = bibliography[key]
        authors = html.escape(entry.get("author", "").replace(" and ", "; "))
        venue = entry.get("booktitle") or entry.get("journal") or entry.get("publisher") or ""
        parts = [f"{authors} ({entry['year']}).".strip() if "year" in entry else authors]
        parts.append(f"<em>{html.escape(entry.get('title', key))}</em>.")
        parts += [
            f"{html.escape(venue)}." if venue else "",
            f"arXiv:{entry['eprint']}." if "eprint" in entry else "",
        ]
        items.append(f'<li id="ref-{html.escape(key)}">' + " ".join(p for p in parts if p) + "</li>")
    return '<h2>References</h2>\n<ol class="references">' + "".join(items) + "</ol>\n"


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
) -> ReportResult:
    """Execute the notebooks that changed, then render the book; see the module docstring.

    Every location defaults to the project's (:mod:`mergelab.paths`); tests pass their own.
    """
    reports = (Path(reports) if reports is not None else paths.reports_dir()).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    quarto_yml = Path(quarto_yml) if quarto_yml is not None else default_quarto_yml()
    chapters = book_chapters(quarto_yml)
    check_chapters(discover_notebooks(notebooks_dir), chapters, quarto_yml)
    selected = discover_notebooks(notebooks_dir, names)
    statuses = run_notebooks(selected, profile, reports, params_dir, source_dir, force)
    missing = [c for c in missing_chapters(reports, chapters) if c.endswith(".ipynb")]
    if names and missing:
        # A subset was asked for: its notebooks ran; the book needs every chapter, so it waits.
        print(f"book not rendered: chapter(s) {', '.join(missing)} not executed yet in {reports}; "
              "run `make report` without NOTEBOOKS to execute them (up-to-date ones are skipped) and render the book.")
        return ReportResult(statuses=statuses, book=None, renderer=None, missing=missing)
    index, used = render_book(reports, quarto_yml, renderer)
    print(f"renderer: {NBCONVERT_NOTE if used == 'nbconvert' else used}")
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 with a message on a :class:`ReportError`)."""
    args = parse_args(argv)
    try:
        build_report(args.profile, args.reports, args.notebooks, args.force, renderer=args.renderer)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
