"""Student notebooks generated from the chapters, which are the solutions: the two never drift.

Every chapter ends with a section ``## Exercises`` (after the cell that writes its results, so that
exercises never change them). The solution delimiters are nbgrader's; nbgrader itself also needs its own cell
metadata (``metadata.nbgrader``), which the chapters do not carry, so a teacher who grades with nbgrader marks the
cells tagged ``solution`` with its *Create Assignment* toolbar before ``nbgrader generate_assignment``:

* an exercise is a Markdown cell tagged ``exercise`` that starts ``### Exercise <chapter>.<k>: <title>``
  (``<chapter>`` is the notebook's number, ``0`` for ``00_...``; ``k`` counts from 1) and states its
  kind in italics: ``*Predict, then run.*``, ``*Implement.*`` or ``*Interpret.*`` (the period optional);
* solution code is a code cell tagged ``solution``: the lines between ``### BEGIN SOLUTION`` and
  ``### END SOLUTION`` are the student's to write; the student version replaces each such block by
  ``raise NotImplementedError("Exercise 0.1: write your solution here")`` at the block's indentation;
  lines outside the blocks stay;
* solution prose is a Markdown cell tagged ``solution``; the student version reads ``*Your answer here.*``;
* a code cell tagged ``exercise-check`` calls a package check that raises ``AssertionError`` with a
  clear message (e.g. :func:`mergelab.merging.check_merge_rule`); students keep it.

Why not nbgrader itself: it brings a Jupyter server extension, a database and a course-directory
layout, heavy for what is needed here (about a hundred lines with ``nbformat``); its delimiters keep the door
open.

``python -m mergelab.course [--out students] [--notebooks NAME ...]`` (``make student``) writes
``students/<chapter>.ipynb``; malformed markup is refused with the notebook and cell named.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .utils import atomic_write_json, atomic_write_text, read_json

EXERCISE_TAG, SOLUTION_TAG, CHECK_TAG = "exercise", "solution", "exercise-check"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ANSWER = "*Your answer here.*"
STUB = 'raise NotImplementedError("Exercise {number}: write your solution here")'
STUB_PATTERN = re.compile(re.escape(STUB).replace(re.escape("{number}"), r"(\d+\.\d+)"))
""":data:`STUB` as a regular expression; group 1 is the exercise number."""
KINDS = ("Predict, then run", "Implement", "Interpret")
SECTION = "## Exercises"
RESULTS_CALL = "write_results("
"""The call in the cell that writes a chapter's results; the exercises come after it."""

_TITLE = re.compile(r"\A### Exercise (?P<chapter>\d+)\.(?P<k>\d+): (?P<title>\S.*)$", re.MULTILINE)


class MarkupError(ValueError):
    """Exercise markup that cannot be turned into a student notebook; the message names notebook and cell."""


@dataclass(frozen=True)
class Exercise:
    """An exercise of a chapter: ``number`` ``"3.2"``, its title, its kind and the index of its cell."""

    number: str
    title: str
    kind: str
    cell: int


def tags(cell: Any) -> list[str]:
    """The cell's tags (``metadata.tags``)."""
    return list(cell.get("metadata", {}).get("tags", []))


def chapter_number(name: str) -> int:
    """``03_task_singular_vectors`` -> 3 (the leading digits of the notebook's name)."""
    match = re.match(r"\d+", Path(name).stem)
    if not match:
        raise MarkupError(f"notebook {name}: its name does not start with the chapter's number (e.g. 03_topic)")
    return int(match.group())


def solution_blocks(source: str, where: str) -> list[tuple[int, int]]:
    """``(begin line, end line)`` of each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` block of a code
    cell (0-based line indices of the markers); ``where`` names the notebook and cell in errors."""
    blocks, begin = [], None
    for i, line in enumerate(source.splitlines()):
        marker = line.strip()
        if marker == BEGIN:
            if begin is not None:
                raise MarkupError(f"{where}: {BEGIN} on line {i + 1} inside the block opened on line {begin + 1}")
            begin = i
        elif marker == END:
            if begin is None:
                raise MarkupError(f"{where}: {END} on line {i + 1} without a {BEGIN} before it")
            if i == begin + 1:
                raise MarkupError(f"{where}: the solution block opened on line {begin + 1} is empty")
            blocks.append((begin, i))
            begin = None
    if begin is not None:
        raise MarkupError(f"{where}: {BEGIN} on line {begin + 1} is never closed by {END}")
    return blocks


def exercises(nb: Any, name: str) -> list[Exercise]:
    """The exercises of notebook ``name``, after checking its markup; raises :class:`MarkupError`.

    Checked: exercises follow the ``## Exercises`` heading, which follows the cell that writes the
    results; titles read ``### Exercise <chapter>.<k>: <title>`` with the notebook's chapter number and
    ``k`` = 1, 2, ...; each states one kind of :data:`KINDS`; ``solution`` and ``exercise-check`` cells
    come after an exercise; a ``solution`` code cell holds at least one well-formed solution block,
    a ``solution`` Markdown cell some text; the solution markers appear in no other cell.
    """
    chapter = chapter_number(name)
    results = max((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and RESULTS_CALL in c.source),
                  default=None)
    section = next((i for i, c in enumerate(nb.cells)
                    if c.cell_type == "markdown" and c.source.lstrip().startswith(SECTION)), None)
    found: list[Exercise] = []
    for i, cell in enumerate(nb.cells):
        where = f"notebook {name}, cell {i} ({cell.cell_type})"
        kinds = tags(cell)
        if EXERCISE_TAG in kinds:
            if cell.cell_type != "markdown":
                raise MarkupError(f"{where}: an '{EXERCISE_TAG}' cell must be Markdown (the exercise's statement)")
            if section is None or i < section:
                raise MarkupError(f"{where}: exercises belong in the section '{SECTION}' at the end of the chapter")
            if results is not None and section < results:
                raise MarkupError(f"notebook {name}: the section '{SECTION}' (cell {section}) must come after the cell "
                                  f"that writes the results (cell {results}), so that exercises never change them")
            match = _TITLE.match(cell.source.lstrip())
            if not match:
                raise MarkupError(f"{where}: an exercise starts with '### Exercise {chapter}.<k>: <title>'; "
                                  f"found {cell.source.strip().splitlines()[0] if cell.source.strip() else 'nothing'!r}")
            number = f"{chapter}.{len(found) + 1}"
            if f"{match['chapter']}.{match['k']}" != number or match["chapter"] != str(chapter):
                raise MarkupError(f"{where}: exercise numbered {match['chapter']}.{match['k']}, expected {number} "
                                  f"(chapter {chapter}, exercises counted from 1 in order)")
            stated = [k for k in KINDS if re.search(rf"\*{re.escape(k)}\.?\*", cell.source)]
            if len(stated) != 1:
                raise MarkupError(f"{where}: exercise {number} must state exactly one kind in italics, one of "
                                  f"{', '.join(f'*{k}*' for k in KINDS)}; found {stated or 'none'}")
            found.append(Exercise(number, match["title"].strip(), stated[0], i))
        elif SOLUTION_TAG in kinds or CHECK_TAG in kinds:
            tag = SOLUTION_TAG if SOLUTION_TAG in kinds else CHECK_TAG
            if not found:
                raise MarkupError(f"{where}: a '{tag}' cell must follow an exercise statement (tagged '{EXERCISE_TAG}')")
            if tag == CHECK_TAG and cell.cell_type != "code":
                raise MarkupError(f"{where}: an '{CHECK_TAG}' cell must be code (it calls a package check)")
            if tag == SOLUTION_TAG and cell.cell_type == "code" and not solution_blocks(cell.source, where):
                raise MarkupError(f"{where}: a '{SOLUTION_TAG}' code cell needs a {BEGIN} ... {END} block around "
                                  "the lines the student writes")
            if tag == SOLUTION_TAG and cell.cell_type == "markdown" and not cell.source.strip():
                raise MarkupError(f"{where}: a '{SOLUTION_TAG}' Markdown cell is empty")
            if tag == SOLUTION_TAG and cell.cell_type not in ("code", "markdown"):
                raise MarkupError(f"{where}: a '{SOLUTION_TAG}' cell must be code or Markdown")
            if tag == CHECK_TAG and (BEGIN in cell.source or END in cell.source):
                raise MarkupError(f"{where}: solution markers in an '{CHECK_TAG}' cell, which students keep")
        elif BEGIN in cell.source or END in cell.source:
            raise MarkupError(f"{where}: solution markers in a cell not tagged '{SOLUTION_TAG}' (students would see "
                              "the solution); tag the cell 'solution'")
    return found


def student_notebook(nb: Any, name: str) -> Any:
    """The student version of the chapter ``nb`` (an ``nbformat`` notebook; left unchanged): every
    solution block replaced by a stub that raises ``NotImplementedError``, every solution Markdown cell by
    :data:`ANSWER`, outputs cleared; every other cell, tag and metadata kept as it is."""
    listed = {e.cell: e.number for e in exercises(nb, name)}
    out = copy.deepcopy(nb)
    number = None
    for i, cell in enumerate(out.cells):
        number = listed.get(i, number)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if SOLUTION_TAG not in tags(cell):
            continue
        if cell.cell_type == "markdown":
            cell.source = ANSWER
            continue
        lines = cell.source.splitlines()
        for begin, end in reversed(solution_blocks(cell.source, f"notebook {name}, cell {i}")):
            indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
            lines[begin : end + 1] = [indent + STUB.format(number=number)]
        cell.source = "\n".join(lines)
    return out


def paste_solutions(student: Any, solution: Any, name: str) -> Any:
    """The student notebook with the solution's blocks and prose pasted back in place of the stubs (what a
    student who wrote the solutions has); equal to ``solution`` cell for cell when generation loses nothing."""
    out = copy.deepcopy(student)
    if len(out.cells) != len(solution.cells):
        raise MarkupError(f"notebook {name}: the student version has {len(out.cells)} cells, the solution "
                          f"{len(solution.cells)}")
    for i, (cell, answer) in enumerate(zip(out.cells, solution.cells)):
        if SOLUTION_TAG not in tags(cell):
            continue
        if cell.cell_type == "markdown":
            cell.source = answer.source
            continue
        source = answer.source.splitlines()
        blocks = iter(solution_blocks(answer.source, f"notebook {name}, cell {i}"))
        lines: list[str] = []
        for line in cell.source.splitlines():
            if STUB_PATTERN.fullmatch(line.strip()):
                begin, end = next(blocks)
                lines += source[begin : end + 1]
            else:
                lines.append(line)
        cell.source = "\n".join(lines)
    return out


WRITTEN = ".written.json"
"""The student folder's record of each copy's SHA-256 as ``make student`` wrote it."""


class StudentWorkError(FileExistsError):
    """A student notebook to be written already exists with other content: a student's answers, kept."""


def write_students(out_dir: Path | None = None, names: Sequence[str] | None = None,
                   notebooks_dir: Path | None = None, force: bool = False) -> list[Path]:
    """Write ``<out_dir>/<chapter>.ipynb`` (default ``<root>/students``) for every chapter (or ``names``);
    return the paths. Every notebook's markup is checked before anything is written. Students work in these
    files: each copy's SHA-256 as written is recorded in ``<out_dir>/.written.json``, and a copy that no longer
    matches it (nor the copy about to be written) holds a student's work: :class:`StudentWorkError` names them,
    and nothing is written, unless ``force``. Copies nobody changed are rewritten, a chapter's fix included."""
    import nbformat

    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else paths.notebooks_dir()
    out_dir = Path(out_dir) if out_dir is not None else paths.project_root() / "students"
    chosen = sorted(notebooks_dir.glob("*.ipynb")) if not names else [notebooks_dir / f"{Path(n).stem}.ipynb" for n in names]
    missing = [p.name for p in chosen if not p.is_file()]
    if missing:
        raise MarkupError(f"no notebook {', '.join(missing)} in {notebooks_dir}")
    students = {p.name: nbformat.writes(student_notebook(nbformat.read(p, as_version=4), p.stem))  # validated
                for p in chosen}
    manifest_path = out_dir / WRITTEN
    manifest = read_json(manifest_path, {})
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).hexdigest()  # noqa: E731
    fresh = {file: digest(text) for file, text in students.items()}
    changed = [out_dir / f for f in students if (out_dir / f).is_file()
               and digest((out_dir / f).read_text(encoding="utf-8")) not in (manifest.get(f), fresh[f])]
    if changed and not force:
        raise StudentWorkError(f"{', '.join(str(p) for p in changed)} changed since `make student` wrote them (a "
                               "student's answers?); nothing was written. Move them away first, or overwrite them "
                               "with `make student FORCE=1` (python -m mergelab.course --force).")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file, text in students.items():
        atomic_write_text(out_dir / file, text)
        manifest[file] = fresh[file]
        written.append(out_dir / file)
    atomic_write_json(manifest_path, manifest)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from .startup import skip_iri_grammar

    skip_iri_grammar()  # nbformat's jsonschema without the IRI grammar it never uses here (mergelab.startup)
    parser = argparse.ArgumentParser(prog="python -m mergelab.course", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the student notebooks (default: students/)")
    parser.add_argument("--notebooks", nargs="+", metavar="NAME", default=None, help="only these chapters")
    parser.add_argument("--force", action="store_true", help="overwrite student notebooks that were changed")
    args = parser.parse_args(argv)
    try:
        written = write_students(args.out, args.notebooks, force=args.force)
    except (MarkupError, StudentWorkError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"student notebook: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
