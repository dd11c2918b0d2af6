"""The report book: Quarto when it is on ``PATH``, else an HTML book of the executed notebooks made
with nbconvert (with citations resolved from ``references.bib``)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergelab.params import ReportError

from .runner import (_FRONT_MATTER, _HEADING, _HEADING_ATTRIBUTES, BOOK_DIR, PROJECT_FILES, RENDERERS, book_chapters,
                     default_quarto_yml)
from .claims import CLAIMS_PAGE, write_claims_page

# --- the book ----------------------------------------------------------------------------------


def sync_project_files(quarto_yml: Path, reports: Path, chapters: Sequence[str] = ()) -> None:
    """Copy the Quarto project (``_quarto.yml``, ``index.qmd``, ``references.bib`` and any other
    non-notebook chapter) into ``reports`` when the book is built outside the project's folder."""
    source = Path(quarto_yml).resolve().parent
    reports = Path(reports).resolve()
    if source == reports:
        return
    shutil.copy2(quarto_yml, reports / "_quarto.yml")
    extra = [c for c in chapters if not c.endswith(".ipynb") and c != CLAIMS_PAGE]
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
    if CLAIMS_PAGE in chapters:  # generated from this run's results, never copied
        write_claims_page(reports, chapters, {Path(c).stem: chapter_title(reports / c)
                                              for c in chapters if c.endswith(".ipynb") and (reports / c).is_file()})
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


