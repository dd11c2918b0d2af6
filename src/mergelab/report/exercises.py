"""Exercises in the book: numbered callouts with their solutions folded under them, in both renderers.

The chapters mark exercises with cell tags (:mod:`mergelab.course`). The two renderers read them
differently:

* pandoc (:mod:`mergelab.report.pandoc_book`): the tags reach ``book.lua`` as cell attributes; it puts an
  ``exercise`` cell in a callout (``div.callout.callout-exercise``, titled by its ``### Exercise 0.1: ...``
  heading) and every run of ``solution`` cells in a folded ``<details class="solution">``.
  :func:`strip_markers` (called by ``pandoc_book.prepare_notebook``) drops the ``### BEGIN/END SOLUTION`` marker
  lines from solution code, which only
  the student-notebook generator needs.
* Quarto cannot see cell tags, so before ``quarto render`` :func:`for_quarto` rewrites the executed
  notebooks in place into Quarto's own syntax: an exercise becomes a ``::: {.callout-note}`` callout
  whose heading is its title, solution prose a ``::: {.callout-tip collapse="true"}`` callout titled
  "Solution to exercise 0.1", solution code gets ``#| code-fold: true`` and a ``code-summary``. The
  original source is kept in ``metadata.mergelab.source``; :func:`restore` (run by the pandoc path)
  puts it back, so that either renderer can follow the other on the same folder. Quarto is not
  installed here: this path is checked on its output notebook (``tests/test_course.py``), not rendered.
"""

from __future__ import annotations

import re
from typing import Any

from mergelab.course import BEGIN, END, EXERCISE_TAG, SOLUTION_TAG, tags

_NUMBER = re.compile(r"### Exercise (\d+\.\d+):")
KEY = "mergelab"
"""Cell metadata key holding the source a renderer's rewrite replaced."""


def restore(nb: Any) -> Any:
    """Undo :func:`for_quarto` in place (every cell back to its source as executed); return ``nb``."""
    for cell in nb.cells:
        saved = cell.get("metadata", {}).pop(KEY, None)
        if saved is not None and "source" in saved:
            cell.source = saved["source"]
    return nb


def strip_markers(source: str) -> str:
    """Solution code without its ``### BEGIN SOLUTION`` / ``### END SOLUTION`` lines."""
    return "\n".join(line for line in source.splitlines() if line.strip() not in (BEGIN, END))


def for_quarto(nb: Any) -> bool:
    """Rewrite the exercise cells of an executed notebook in place into Quarto callouts and folded
    solution code (see the module docstring); return whether anything changed. Idempotent."""
    restore(nb)
    changed, number = False, "?"
    for cell in nb.cells:
        kinds = tags(cell)
        if EXERCISE_TAG not in kinds and SOLUTION_TAG not in kinds:
            continue
        original = cell.source
        if EXERCISE_TAG in kinds:
            match = _NUMBER.search(original)
            number = match.group(1) if match else number
            body = original.replace("### Exercise", "## Exercise", 1)
            cell.source = f'::: {{.callout-note .exercise icon="false"}}\n{body}\n:::'
        elif cell.cell_type == "markdown":
            cell.source = (f'::: {{.callout-tip .solution collapse="true"}}\n## Solution to exercise {number}\n\n'
                           f"{original}\n:::")
        else:
            cell.source = (f'#| code-fold: true\n#| code-summary: "Solution code (exercise {number})"\n'
                           f"{strip_markers(original)}")
        cell.metadata[KEY] = {"source": original}
        changed = True
    return changed
