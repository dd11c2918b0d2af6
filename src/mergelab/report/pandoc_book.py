"""The book without Quarto: one HTML page per chapter made by pandoc (from the ``pypandoc-binary``
wheel), reading the executed notebooks (``-f ipynb``) and the ``.qmd`` pages (Markdown).

Pandoc does the reading and writing: citations with ``--citeproc`` and the project's
``references.bib`` (a reference list per chapter), math as MathML (rendered by the browser, offline),
images extracted next to the pages. What Quarto reads from cell options (``#| echo``, ``#| label``,
``#| fig-cap``) is moved into cell metadata by :func:`prepare_notebook`, and ``book.lua`` (a pandoc
Lua filter) turns it into hidden or folded code, numbered figures and ``@fig-`` links. Each page
gets the chapter's number, a side bar listing every chapter and previous/next links.
"""

from __future__ import annotations

import ast
import html
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergelab.params import ReportError
from mergelab.utils import atomic_write

from ..course import CHECK_TAG, EXERCISE_TAG, SOLUTION_TAG, tags
from .exercises import restore, strip_markers
from .runner import BOOK_DIR

LUA_FILTER = Path(__file__).with_name("book.lua")
PARAMETER_TAGS = ("parameters", "injected-parameters")
"""Cells that papermill reads or writes: hidden in the book, their values shown once in a table."""
EXERCISE_TAGS = (EXERCISE_TAG, SOLUTION_TAG, CHECK_TAG)
"""Tags of :mod:`mergelab.course` that ``book.lua`` reads (callouts, folded solutions)."""

MARKDOWN = "markdown-implicit_figures"
IPYNB = "ipynb+citations+footnotes+header_attributes+fenced_divs+bracketed_spans"

STYLE = """<style>
body{max-width:54em;padding:2em 2em 4em 17em;font-family:system-ui,-apple-system,"Segoe UI",sans-serif;
  line-height:1.55;color:#212529;hyphens:manual}
nav.book{position:fixed;top:0;left:0;bottom:0;width:14em;overflow:auto;padding:1.5em 1em;
  background:#f7f7f9;border-right:1px solid #e3e3e3;font-size:.9em}
nav.book ol{list-style:none;padding:0}nav.book li{margin:.35em 0}
nav.book a{color:#343a40;text-decoration:none}nav.book a.current{font-weight:600;color:#2780e3}
nav.book .title{font-weight:600;margin-bottom:1em;display:block}
nav.pager{display:flex;justify-content:space-between;gap:1em;margin-top:3em;padding-top:1em;
  border-top:1px solid #ddd}
header#title-block-header{text-align:left}h1.title{font-size:2em}
a{color:#2780e3}figure{margin:1.5em 0}figcaption{font-size:.92em;color:#495057;text-align:left}
.figure-number,.chapter-number{font-weight:600}.chapter-number{margin-right:.3em}
details.code-fold>summary,details.parameters>summary,details.long-output>summary{cursor:pointer;color:#6c757d;font-size:.9em}
div.output pre{background:none;border-left:3px solid #e3e3e3;padding-left:.8em}
div.cell{margin:1em 0}table{font-size:.9em;margin:1em 0}
div.output table{border-collapse:collapse}div.output th,div.output td{padding:.2em .6em;text-align:right}
div.callout-exercise{border-left:4px solid #2780e3;background:#f3f8fe;padding:.2em 1em;margin:1.5em 0 .5em}
div.callout-exercise h3{margin-top:.6em}
details.solution{border-left:4px solid #3fb618;background:#f4fbf2;padding:.4em 1em;margin:.5em 0 1.5em}
details.solution>summary{cursor:pointer;font-weight:600;color:#2d7a1f}
@media (max-width:60em){body{padding:1em}nav.book{position:static;width:auto;border:0}}
</style>
"""


def pandoc_binary() -> str:
    """The pandoc executable shipped in the ``pypandoc-binary`` wheel (or pandoc on ``PATH``)."""
    try:
        import pypandoc

        return str(pypandoc.get_pandoc_path())
    except (ImportError, OSError) as err:
        found = shutil.which("pandoc")
        if found:
            return found
        raise ReportError(
            "pandoc is needed to render the book without Quarto: `pip install pypandoc-binary` (a project "
            "dependency; run `make env`)."
        ) from err


# --- the notebook, prepared for pandoc ---------------------------------------------------------


def cell_options(source: str) -> tuple[dict[str, Any], str]:
    """``(options, code)`` of a code cell: the leading ``#| key: value`` lines read as YAML, and the
    source without them."""
    lines = source.splitlines()
    head = 0
    while head < len(lines) and lines[head].startswith("#|"):
        head += 1
    if head == 0:
        return {}, source
    options = yaml.safe_load("\n".join(line[2:].strip() for line in lines[:head])) or {}
    return (options if isinstance(options, dict) else {}), "\n".join(lines[head:]).lstrip("\n")


def parameter_values(nb: Any) -> dict[str, Any]:
    """The values the notebook ran with: its ``parameters`` cell's literals, overridden by what papermill
    injected (``metadata.papermill.parameters``)."""
    values: dict[str, Any] = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            values.update(_literal_assignments(cell.source))
    values.update(((nb.metadata.get("papermill") or {}).get("parameters")) or {})
    return values


def _literal_assignments(source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                out[node.targets[0].id] = ast.get_source_segment(source, node.value)
    return out


def parameters_html(values: Mapping[str, Any]) -> str:
    """A folded table of the run's parameters (one row each), as HTML."""
    rows = "".join(f"<tr><td><code>{html.escape(name)}</code></td>"
                   f"<td><code>{html.escape(json.dumps(value, default=str))}</code></td></tr>"
                   for name, value in values.items())
    profile = f" (profile <code>{html.escape(str(values['profile']))}</code>)" if "profile" in values else ""
    return (f'<details class="parameters"><summary>Parameters of this run{profile}</summary>'
            f'<table class="parameters"><thead><tr><th>Parameter</th><th>Value</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></details>")


def prepare_notebook(nb: Any) -> Any:
    """A copy of an executed notebook ready for ``pandoc -f ipynb`` and ``book.lua``.

    * the ``parameters`` and papermill's ``injected-parameters`` cells go; a folded table of the values
      follows the first Markdown cell (the title);
    * ``#| key: value`` options leave the source and become cell metadata (``echo``, ``label``,
      ``fig-cap``), which pandoc hands to the filter as attributes;
    * Markdown outputs (``IPython.display.Markdown``) become Markdown cells, so that their citations,
      math and ``@fig-`` references are read like the rest of the text (pandoc would show their
      ``text/plain`` form); those of a solution keep its tag, so they stay folded with it;
    * widget outputs (progress bars) and stderr streams go;
    * exercise cells keep their tags (``book.lua`` makes callouts and folded solutions of them), solution
      code loses its ``### BEGIN/END SOLUTION`` marker lines, and a Quarto rewrite of the exercises
      (:func:`mergelab.report.exercises.for_quarto`) is undone first.
    """
    import copy

    from nbformat.v4 import new_code_cell, new_markdown_cell, new_raw_cell

    nb = restore(copy.deepcopy(nb))
    cells: list[Any] = []
    params = parameter_values(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            cells.append(cell)
            if params and cell.cell_type == "markdown" and len(cells) == 1:
                cells.append(new_raw_cell(parameters_html(params), metadata={"format": "text/html"}))
                params = {}
            continue
        if set(tags(cell)) & set(PARAMETER_TAGS):
            continue
        options, source = cell_options(cell.source)
        meta = {k: options[k] for k in ("echo", "label", "fig-cap") if k in options}
        book_tags = [t for t in tags(cell) if t in EXERCISE_TAGS]
        if book_tags:
            meta["tags"] = book_tags
            source = strip_markers(source) if SOLUTION_TAG in book_tags else source
        segment = new_code_cell(source, metadata=dict(meta))
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue
            if "application/vnd.jupyter.widget-view+json" in data:
                continue
            if "text/markdown" in data:
                if segment.source.strip() or segment.outputs:  # not an empty piece between two Markdown outputs
                    cells.append(segment)
                # a solution's printed prose stays in the solution's fold, hidden until it is unfolded
                prose_tags = {"tags": [SOLUTION_TAG]} if SOLUTION_TAG in book_tags else {}
                cells.append(new_markdown_cell(_text(data["text/markdown"]), metadata=prose_tags))
                segment = new_code_cell("", metadata={"echo": False, **{k: v for k, v in meta.items() if k != "echo"}})
                continue
            segment.outputs.append(output)
        if segment.source.strip() or segment.outputs:
            cells.append(segment)
    if params:  # no Markdown cell at all
        cells.insert(0, new_raw_cell(parameters_html(params), metadata={"format": "text/html"}))
    nb.cells = cells
    return nb


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


# --- the pages ---------------------------------------------------------------------------------


def chapter_numbers(chapters: Sequence[str]) -> dict[str, str]:
    """Chapter file -> its number in the book: a notebook's own number (``04_mass_routing.ipynb`` -> ``4``),
    the one its text ("TSV-C (chapter 3)"), its exercises ("Exercise 4.1") and the course tools use, so the
    side bar, the title and the figures ("Figure 4.1") agree with them. Pages that are not numbered notebooks
    (``index``, the claims and teaching pages) have none. (Quarto numbers a book's chapters 1, 2, ... in
    order, so a Quarto book's numbers are not the notebooks'.)"""
    from ..course import MarkupError, chapter_number

    numbers = {}
    for chapter in chapters[1:]:
        if chapter.endswith(".ipynb"):
            try:
                numbers[chapter] = str(chapter_number(chapter))
            except MarkupError:  # a notebook whose name has no number: unnumbered
                pass
    return numbers


def page_name(chapter: str) -> str:
    """``00_topic.ipynb`` -> ``00_topic.html``."""
    return Path(chapter).with_suffix(".html").as_posix()


def sidebar(title: str, pages: Sequence[tuple[str, str, str]], current: int) -> str:
    """The side bar of every page: the book's title and every chapter, numbered, the current one marked."""
    items = []
    for position, (_, page, name) in enumerate(pages):
        mark = ' class="current" aria-current="page"' if position == current else ""
        items.append(f'<li><a href="{html.escape(page)}"{mark}>{html.escape(name)}</a></li>')
    return (f'<nav class="book" aria-label="Chapters"><a class="title" href="index.html">{html.escape(title)}</a>'
            f'<ol>{"".join(items)}</ol></nav>\n')


def pager(pages: Sequence[tuple[str, str, str]], current: int) -> str:
    """Previous and next chapter links at the bottom of a page."""
    previous = (f'<a rel="prev" href="{html.escape(pages[current - 1][1])}">&larr; {html.escape(pages[current - 1][2])}</a>'
                if current > 0 else "<span></span>")
    following = (f'<a rel="next" href="{html.escape(pages[current + 1][1])}">{html.escape(pages[current + 1][2])} &rarr;</a>'
                 if current + 1 < len(pages) else "<span></span>")
    return f'<nav class="pager" aria-label="Previous and next chapter">{previous}{following}</nav>\n'


def build_pandoc_book(reports: Path, chapters: Sequence[str], titles: Mapping[str, str], title: str,
                      bibliography: Sequence[str] = ()) -> Path:
    """Render every chapter of ``reports`` into ``reports/_book/`` with pandoc; return ``index.html``.

    Args:
        reports: folder with the executed notebooks and the ``.qmd`` pages.
        chapters: the book's chapters in order (``book.chapters``); the first is the index page.
        titles: chapter file -> its title (for the side bar and the previous/next links).
        title: the book's title.
        bibliography: ``.bib`` files (relative to ``reports``) for ``--citeproc``.
    """
    import nbformat

    reports = Path(reports).resolve()
    book = reports / BOOK_DIR
    book.mkdir(parents=True, exist_ok=True)
    numbers = chapter_numbers(chapters)
    pages = [(c, "index.html" if i == 0 else page_name(c),
              f"{numbers[c]}  {titles[c]}" if c in numbers else titles[c]) for i, c in enumerate(chapters)]
    bibs = [str(reports / b) for b in bibliography if (reports / b).is_file()]
    pandoc = pandoc_binary()
    with tempfile.TemporaryDirectory(prefix="mergelab-book-") as tmp:
        for position, (chapter, page, _) in enumerate(pages):
            source = reports / chapter
            media = f"media/{Path(chapter).stem}"
            if chapter.endswith(".ipynb"):
                prepared = Path(tmp) / source.name
                nbformat.write(prepare_notebook(nbformat.read(source, as_version=4)), prepared)
                source, reader = prepared, IPYNB
            else:
                reader = MARKDOWN
            before, after = Path(tmp) / f"{position}.before.html", Path(tmp) / f"{position}.after.html"
            before.write_text(sidebar(title, pages, position), encoding="utf-8")
            after.write_text(pager(pages, position), encoding="utf-8")
            header = Path(tmp) / "style.html"
            header.write_text(STYLE, encoding="utf-8")
            args = [pandoc, str(source), "--from", reader, "--to", "html5", "--standalone", "--mathml",
                    "--lua-filter", str(LUA_FILTER), "--citeproc", *[f"--bibliography={b}" for b in bibs],
                    "--metadata", "link-citations=true", "--metadata", "reference-section-title=References",
                    "--metadata", f"pagetitle={titles[chapter]} – {title}", "--section-divs",
                    "--extract-media", media, "--include-in-header", str(header),
                    "--include-before-body", str(before), "--include-after-body", str(after)]
            if chapter in numbers:
                args += ["--metadata", f"chapter-number={numbers[chapter]}"]
            # through a file beside the page (its relative links hold), renamed once whole: an interrupted or
            # failed render leaves the last page
            atomic_write(book / page, lambda out: _run_pandoc(args, book, chapter, out))
            prune_media(book, media, (book / page).read_text(encoding="utf-8"))
    return book / "index.html"


def _run_pandoc(args: Sequence[str], book: Path, chapter: str, output: Path) -> None:
    """Run pandoc's ``args`` in ``book`` writing ``output``; its warnings are printed, a failure is a
    :class:`ReportError` naming ``chapter`` with pandoc's message."""
    done = subprocess.run([*args, "--output", str(output)], cwd=book, capture_output=True, text=True,
                          env={**os.environ, "LANG": "C.UTF-8"})
    if done.returncode != 0:
        raise ReportError(f"pandoc could not render {chapter} (exit code {done.returncode}):\n{done.stderr.strip()}")
    for line in done.stderr.splitlines():
        print(f"pandoc ({chapter}): {line}")


def prune_media(book: Path, media: str, page: str) -> list[str]:
    """Remove the files under ``book / media`` that the rendered ``page`` (its HTML) no longer names: the figures
    of an earlier render. pandoc names extracted media by a hash of their bytes, so a figure that did not change
    keeps its file, and the old page's figures stay in place until the new page has replaced it. Returns the
    removed paths, relative to ``book``."""
    folder = book / media
    removed = []
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        name = path.relative_to(book).as_posix()
        if path.is_file() and name not in page:
            path.unlink()
            removed.append(name)
    return removed
