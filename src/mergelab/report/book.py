"""The report book: Quarto when it is on ``PATH`` or in the venv, else an HTML book of the executed notebooks made
with pandoc (:mod:`mergelab.report.pandoc_book`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergelab.params import ReportError

from .pandoc_book import build_pandoc_book
from .runner import (_FRONT_MATTER, _HEADING, BOOK_DIR, PROJECT_FILES, RENDERERS, book_chapters,
                     default_quarto_yml)
from ..utils import atomic_copy, atomic_write_text
from .claims import CLAIMS_PAGE, write_claims_page
from .exercises import for_quarto
from .teaching import TEACHING_PAGE, write_teaching_page

# --- the book ----------------------------------------------------------------------------------


def sync_project_files(quarto_yml: Path, reports: Path, chapters: Sequence[str] = ()) -> None:
    """Copy the Quarto project (``_quarto.yml``, ``index.qmd``, ``references.bib`` and any other
    non-notebook chapter) into ``reports`` when the book is built outside the project's folder."""
    source = Path(quarto_yml).resolve().parent
    reports = Path(reports).resolve()
    if source == reports:
        return
    atomic_copy(quarto_yml, reports / "_quarto.yml")  # an interrupted copy never leaves half a file
    extra = [c for c in chapters if not c.endswith(".ipynb") and c not in (CLAIMS_PAGE, TEACHING_PAGE)]
    for name in dict.fromkeys([*PROJECT_FILES[1:], *extra]):
        if (source / name).is_file():
            (reports / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(source / name, reports / name)


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
        renderer: ``"auto"`` (Quarto if on ``PATH``, else pandoc), ``"quarto"`` or ``"pandoc"``.
    """
    if renderer not in RENDERERS:
        raise ReportError(f"renderer={renderer!r} is not valid; use one of {', '.join(RENDERERS)}.")
    reports = Path(reports).resolve()
    quarto_yml = Path(quarto_yml) if quarto_yml is not None else default_quarto_yml()
    chapters = book_chapters(quarto_yml)
    sync_project_files(quarto_yml, reports, chapters)
    # each executed notebook is read once for its title (they are large: their figures are inline)
    notebook_titles = {c: chapter_title(reports / c) for c in chapters if c.endswith(".ipynb") and (reports / c).is_file()}
    by_stem = {Path(c).stem: t for c, t in notebook_titles.items()}
    if CLAIMS_PAGE in chapters:  # generated from this run's results, never copied
        write_claims_page(reports, chapters, by_stem)
    if TEACHING_PAGE in chapters:  # generated from the template, the timing record and the chapters' exercises
        write_teaching_page(reports, quarto_yml.resolve().parent, chapters, by_stem)
    missing = missing_chapters(reports, chapters)
    if missing:
        raise ReportError(
            f"the book cannot be rendered: chapter(s) {', '.join(missing)} are missing from {reports}. "
            f"Run `make report` for all notebooks (up-to-date ones are skipped)."
        )
    quarto = quarto_executable()
    if renderer == "quarto" and quarto is None:
        raise ReportError(
            "renderer='quarto' was asked for but quarto is not on PATH; `make quarto` tries "
            "`pip install quarto-cli`, or install it from https://quarto.org or conda-forge; or use 'auto'."
        )
    if renderer != "pandoc" and quarto is not None:
        quarto_exercises(reports, chapters)
        completed = subprocess.run([quarto, "render", str(reports)], check=False)
        if completed.returncode != 0:
            raise ReportError(
                f"`quarto render {reports}` failed (exit code {completed.returncode}); see its output above."
            )
        return reports / BOOK_DIR / "index.html", "quarto"
    config = yaml.safe_load(quarto_yml.read_text(encoding="utf-8")) or {}
    title = str((config.get("book") or {}).get("title") or "Report")
    files = config.get("bibliography") or []
    titles = {c: notebook_titles[c] if c in notebook_titles else chapter_title(reports / c) for c in chapters}
    return build_pandoc_book(reports, chapters, titles, title, [files] if isinstance(files, str) else files), "pandoc"


def quarto_exercises(reports: Path, chapters: Sequence[str]) -> list[Path]:
    """Rewrite the exercises of the executed notebooks in ``reports`` into Quarto callouts, in place
    (:func:`mergelab.report.exercises.for_quarto`); return the notebooks changed."""
    import nbformat

    changed = []
    for chapter in chapters:
        path = Path(reports) / chapter
        if chapter.endswith(".ipynb") and path.is_file():
            nb = nbformat.read(path, as_version=4)
            if for_quarto(nb):
                atomic_write_text(path, nbformat.writes(nb))
                changed.append(path)
    return changed


def quarto_executable() -> str | None:
    """``quarto`` on ``PATH``, or next to this Python (``pip install quarto-cli`` puts it in the venv)."""
    return shutil.which("quarto") or shutil.which("quarto", path=str(Path(sys.executable).parent))
