"""The teacher's page of the book, ``teaching.qmd``, generated at every render like the claims page.

Its prose is the committed template ``reports/_teaching.qmd`` (Quarto skips files starting with ``_``);
the marker ``<!-- session-times -->`` in it is replaced by the table of sessions: per chapter, the
wall time measured at the ``tiny`` size read from the committed record ``reports/timings-tiny.json``
(:mod:`mergelab.report.timings`), the machine, load and cache state of that run, and the chapter's
exercises by kind (read from the executed notebooks, :func:`mergelab.course.exercises`). Nothing in
the table is typed in: a chapter without a measured run says so.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..course import MarkupError, exercises
from ..utils import atomic_write_text

TEACHING_PAGE = "teaching.qmd"
"""The generated page, listed in ``book.chapters`` of ``reports/_quarto.yml``."""
TEMPLATE = "_teaching.qmd"
MARKER = "<!-- session-times -->"


def _load_sentence(loads: list[float], cores: int) -> str:
    """What the 1-minute load averages at the start of the runs say about the machine. ``make report`` runs the
    chapters side by side, one lane per core, and a chapter may start worker processes of its own, so the book's
    own work accounts for a load up to about twice the number of cores; only more than that means other work."""
    said = f"The 1-minute load average at the start of the runs was {min(loads)} to {max(loads)} on {cores} cores"
    if max(loads) > 2 * cores + 0.5:
        return said + (": above what the book's own lanes and their workers account for, so other work shared the "
                       "machine and an idle machine of this kind is faster.")
    return said + (", no more than the book's own lanes (one chapter per core, some with worker processes) account "
                   "for: the machine did nothing else of note.")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def chapter_exercises(notebook: Path) -> list[Any]:
    """The exercises of a chapter's notebook (empty when it has none or is missing)."""
    import nbformat

    if not Path(notebook).is_file():
        return []
    return exercises(nbformat.read(notebook, as_version=4), Path(notebook).stem)


def sessions_markdown(record: Mapping[str, Any] | None, chapters: Sequence[str], titles: Mapping[str, str],
                      found: Mapping[str, Sequence[Any]]) -> str:
    """The table of sessions (one per chapter) and a sentence on the machine and date of the timings.

    Args:
        record: the committed timing record (``{"profile", "note", "chapters": [timing records]}``), or ``None``.
        chapters: the chapters' notebook file names, in book order.
        titles: notebook stem -> title.
        found: notebook stem -> its exercises (:class:`mergelab.course.Exercise`).
    """
    timed = {c["notebook"]: c for c in (record or {}).get("chapters", [])}
    lines = ["| Session | Chapter | Run time at `tiny` | Cache | Load (1 min) | CPU time | Exercises |",
             "|---|---|---|---|---|---|---|"]
    total = 0.0
    for session, chapter in enumerate(chapters, start=1):
        stem = Path(chapter).stem
        t = timed.get(stem)
        kinds = Counter(e.kind.lower().replace(", then ", "-then-") for e in found.get(stem, []))
        listed = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none yet"
        count = len(found.get(stem, []))
        if t:
            total += t["wall_s"]
            load = (t.get("load_average_start") or ["not recorded"])[0]
            cpu = t.get("cpu_s")
            lines.append(f"| {session} | {titles.get(stem, stem)} (`{stem[:2]}`) | {_minutes(t['wall_s'])} | {t['cache']} | "
                         f"{load} | {'not recorded' if cpu is None else _minutes(cpu)} | {count} ({listed}) |")
        else:
            lines.append(f"| {session} | {titles.get(stem, stem)} (`{stem[:2]}`) | not measured | | | | {count} ({listed}) |")
    if not timed:
        from .timings import RECORD

        return "\n".join(lines) + "\n\nNo timing record is committed yet (`reports/" + RECORD + "`).\n"
    runs = list(timed.values())
    cpu = [r.get("cpu_s") for r in runs]
    machine = runs[0]["machine"]
    dates = sorted(r["started_utc"][:10] for r in runs)
    loads = [r["load_average_start"][0] for r in runs if r.get("load_average_start")]
    imported = [r for r in runs if r.get("source")]
    text = [
        "\n".join(lines), "",
        f"Measured at the `{record.get('profile', 'tiny')}` size on {machine['cpu_model']} "
        f"({machine['cores']} cores, {machine['system']}), {dates[0]}"
        + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
        + f"; {_minutes(total)} for the {len(runs)} chapters measured"
        + (f", {_minutes(sum(cpu))} of CPU time (every process of a chapter: its kernel and its workers; with k "
           f"cores free for it, a chapter takes at least its CPU time / k). " if None not in cpu else ". ")
        + (_load_sentence(loads, machine["cores"]) if loads else
           "The load average of these runs was not recorded; the machine was shared with other work."),
    ]
    if imported:
        text += ["", f"{len(imported)} of the times are the papermill durations of notebooks executed before the runner "
                 "recorded load and cache state (cache *unknown*, load *not recorded*): "
                 + "; ".join(f"`{r['notebook'][:2]}` on {r['started_utc'][:16].replace('T', ' ')} UTC" for r in imported) + "."]
    if record.get("note"):
        text += ["", str(record["note"])]
    return "\n".join(text) + "\n"


def teaching_markdown(template: str, record: Mapping[str, Any] | None, chapters: Sequence[str],
                      titles: Mapping[str, str], found: Mapping[str, Sequence[Any]]) -> str:
    """The page: ``template`` with :data:`MARKER` replaced by :func:`sessions_markdown`."""
    if MARKER not in template:
        raise ValueError(f"the teacher's page template has no {MARKER} line where the session table goes")
    notebooks = [c for c in chapters if c.endswith(".ipynb")]
    return template.replace(MARKER, sessions_markdown(record, notebooks, titles, found).rstrip("\n"))


def write_teaching_page(reports: Path, source: Path, chapters: Sequence[str], titles: Mapping[str, str]) -> Path:
    """Write ``<reports>/teaching.qmd`` (atomically) from the template and timing record in ``source`` (the
    folder of ``_quarto.yml``) and the executed notebooks in ``reports``; return its path."""
    found: dict[str, list[Any]] = {}
    for chapter in chapters:
        if chapter.endswith(".ipynb"):
            try:
                found[Path(chapter).stem] = chapter_exercises(Path(reports) / chapter)
            except MarkupError:
                found[Path(chapter).stem] = []  # the student-notebook tests name the fault; the page renders
    from .timings import RECORD, read_record

    template = (Path(source) / TEMPLATE).read_text(encoding="utf-8")
    page = teaching_markdown(template, read_record(Path(source) / RECORD), chapters, titles, found)
    path = Path(reports) / TEACHING_PAGE
    atomic_write_text(path, page)
    return path
