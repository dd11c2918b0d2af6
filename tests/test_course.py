"""The course in a box: exercise markup in every chapter, the student notebooks generated from it, the
exercises in the book (both renderers) and the teacher's page (``mergelab.course``, issue 23)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from conftest import NOTEBOOKS, smoke_data_dir
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mergelab import course, report
from mergelab.report.exercises import for_quarto, restore
from mergelab.report.pandoc_book import prepare_notebook
from mergelab.report.teaching import MARKER, TEMPLATE, sessions_markdown, teaching_markdown
from mergelab.report.timings import RECORD, read_record

ROOT = Path(__file__).resolve().parents[1]
STUB = course.STUB_PATTERN  # the stub a student sees, group 1 its exercise number


def chapter(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


# --- the markup of every chapter -------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_chapter_ends_with_at_least_two_exercises_of_mixed_kinds(name):
    exercises = course.exercises(chapter(name), name)  # raises MarkupError naming notebook and cell
    assert len(exercises) >= 2, f"{name}: {len(exercises)} exercise(s); the course needs at least two per chapter"
    assert len({e.kind for e in exercises}) >= 2, f"{name}: every exercise is of kind {exercises[0].kind}"
    nb = chapter(name)
    for e in exercises:  # each exercise has a worked solution: a solution cell before the next exercise
        following = nb.cells[e.cell + 1:]
        upto = next((i for i, c in enumerate(following) if "exercise" in course.tags(c)), len(following))
        assert any("solution" in course.tags(c) for c in following[:upto]), f"{name}: exercise {e.number} has no solution"


def test_chapter_00_has_the_merge_rule_checked_by_the_package_contract():
    nb = chapter("00_benchmark_and_baselines")
    checks = [c.source for c in nb.cells if "exercise-check" in course.tags(c)]
    assert any("check_merge_rule(" in s for s in checks)
    assert any(e.kind == "Implement" for e in course.exercises(nb, "00_benchmark_and_baselines"))


# --- student notebooks -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_notebook_is_valid_has_no_solution_left_and_keeps_everything_else(name):
    solution = chapter(name)
    student = course.student_notebook(solution, name)
    nbformat.validate(student)
    assert len(student.cells) == len(solution.cells)
    for i, (s, ref) in enumerate(zip(student.cells, solution.cells)):
        assert s.cell_type == ref.cell_type and course.tags(s) == course.tags(ref), f"{name}, cell {i}"
        assert course.BEGIN not in s.source and course.END not in s.source, f"{name}, cell {i}: solution markers left"
        if "solution" not in course.tags(ref):
            assert s.source == ref.source, f"{name}, cell {i}: a cell that is no solution changed"
        elif ref.cell_type == "markdown":
            assert s.source == course.ANSWER
        else:
            lines = ref.source.splitlines()
            for begin, end in course.solution_blocks(ref.source, name):
                block = "\n".join(lines[begin + 1:end])
                assert block not in s.source, f"{name}, cell {i}: solution code left in the student version"
            assert STUB.search(s.source), f"{name}, cell {i}: no stub where the solution was"
    numbers = [m for c in student.cells for m in STUB.findall(c.source)]
    exercises = [e.number for e in course.exercises(solution, name)]
    assert set(numbers) <= set(exercises), "a stub names an exercise that does not exist"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_student_notebook_with_the_solutions_pasted_back_is_the_chapter_cell_for_cell(name):
    solution = chapter(name)
    pasted = course.paste_solutions(course.student_notebook(solution, name), solution, name)
    assert [(c.cell_type, c.source, c.metadata) for c in pasted.cells] == \
           [(c.cell_type, c.source, c.metadata) for c in solution.cells]


def test_stub_keeps_the_indentation_and_the_lines_outside_the_block():
    nb = _markup_notebook(code="def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n")
    student = course.student_notebook(nb, "03_x")
    assert student.cells[-2].source == ('def f(x):\n    y = 1\n'
                                        '    raise NotImplementedError("Exercise 3.1: write your solution here")')
    assert student.cells[-1].source == course.ANSWER


def _markup_notebook(code: str = "### BEGIN SOLUTION\nx = 1\n### END SOLUTION", heading: str = "### Exercise 3.1: a title",
                     kind: str = "*Implement.*", results_first: bool = True, code_tags=("solution",)) -> nbformat.NotebookNode:
    cells = [new_markdown_cell("# Chapter"), new_code_cell("write_results(session, results)"),
             new_markdown_cell("## Exercises"),
             new_markdown_cell(f"{heading}\n\n{kind} Do it.", metadata={"tags": ["exercise"]}),
             new_code_cell(code, metadata={"tags": list(code_tags)}),
             new_markdown_cell("Because.", metadata={"tags": ["solution"]})]
    if not results_first:
        cells.append(cells.pop(1))
    return new_notebook(cells=cells)


@pytest.mark.parametrize("notebook, message", [
    (_markup_notebook("### BEGIN SOLUTION\nx = 1"), r"03_x, cell 4 \(code\): ### BEGIN SOLUTION on line 1 is never closed"),
    (_markup_notebook("x = 1\n### END SOLUTION"), r"03_x, cell 4 \(code\): ### END SOLUTION on line 2 without"),
    (_markup_notebook("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx\n### END SOLUTION"), r"cell 4 .*inside the block"),
    (_markup_notebook("### BEGIN SOLUTION\n### END SOLUTION"), r"cell 4 .*block opened on line 1 is empty"),
    (_markup_notebook("x = 1"), r"cell 4 \(code\): a 'solution' code cell needs a ### BEGIN SOLUTION"),
    (_markup_notebook(heading="### Exercise 3.2: a title"), r"cell 3 .*numbered 3.2, expected 3.1"),
    (_markup_notebook(heading="### Exercise 4.1: a title"), r"cell 3 .*numbered 4.1, expected 3.1"),
    (_markup_notebook(heading="### Exercise: a title"), r"cell 3 .*starts with '### Exercise 3.<k>: <title>'"),
    (_markup_notebook(kind="Do it."), r"cell 3 .*exactly one kind"),
    (_markup_notebook(results_first=False), r"must come after the cell that writes the results"),
    (_markup_notebook(code="### BEGIN SOLUTION\nx\n### END SOLUTION", code_tags=()), r"cell 4 .*not tagged 'solution'"),
    (_markup_notebook(code_tags=("exercise-check",)), r"cell 4 .*solution markers in an 'exercise-check' cell"),
])
def test_malformed_markup_is_refused_naming_the_notebook_and_the_cell(notebook, message):
    with pytest.raises(course.MarkupError) as err:
        course.student_notebook(notebook, "03_x")
    assert "notebook 03_x" in str(err.value) and re.search(message, str(err.value)), str(err.value)


def test_a_solution_before_any_exercise_is_refused():
    nb = _markup_notebook()
    nb.cells.insert(1, new_code_cell("### BEGIN SOLUTION\nx\n### END SOLUTION", metadata={"tags": ["solution"]}))
    with pytest.raises(course.MarkupError, match=r"notebook 03_x, cell 1 \(code\): a 'solution' cell must follow"):
        course.exercises(nb, "03_x")


def test_make_student_writes_a_notebook_per_chapter_and_refuses_bad_markup(tmp_path, capsys):
    assert course.main(["--out", str(tmp_path / "students")]) == 0
    assert sorted(p.stem for p in (tmp_path / "students").glob("*.ipynb")) == NOTEBOOKS
    assert "student notebook:" in capsys.readouterr().out
    # run again after a chapter is fixed: the copy nobody touched is rewritten with the fix
    (tmp_path / "fixed").mkdir()
    for name in NOTEBOOKS[:2]:
        (tmp_path / "fixed" / f"{name}.ipynb").write_bytes((ROOT / "notebooks" / f"{name}.ipynb").read_bytes())
    fixed = nbformat.read(tmp_path / "fixed" / f"{NOTEBOOKS[1]}.ipynb", as_version=4)
    fixed.cells[0].source += "\n\nA typo fixed."
    nbformat.write(fixed, tmp_path / "fixed" / f"{NOTEBOOKS[1]}.ipynb")
    course.write_students(tmp_path / "students", [NOTEBOOKS[1]], notebooks_dir=tmp_path / "fixed")
    assert "A typo fixed." in (tmp_path / "students" / f"{NOTEBOOKS[1]}.ipynb").read_text()
    # a copy a student answered in is kept, whatever changed in the chapter
    answered = tmp_path / "students" / f"{NOTEBOOKS[0]}.ipynb"
    nb = nbformat.read(answered, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("x = 'my answer'"))
    nbformat.write(nb, answered)
    assert course.main(["--out", str(tmp_path / "students")]) == 1
    assert "my answer" in answered.read_text() and "nothing was written" in capsys.readouterr().err
    assert course.main(["--out", str(tmp_path / "students"), "--notebooks", NOTEBOOKS[1]]) == 0  # another chapter
    assert course.main(["--out", str(tmp_path / "students"), "--force"]) == 0 and "my answer" not in answered.read_text()
    (tmp_path / "nbs").mkdir()
    nbformat.write(_markup_notebook("x = 1"), tmp_path / "nbs" / "03_x.ipynb")
    with pytest.raises(course.MarkupError, match="03_x, cell 4"):
        course.write_students(tmp_path / "out", notebooks_dir=tmp_path / "nbs")
    assert not (tmp_path / "out").exists(), "nothing is written when a chapter's markup is wrong"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^student: env ## .+\n\t\$\(PY\) -m mergelab.course --out students", makefile, re.MULTILINE)
    assert "students/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_git_filter_keeps_the_exercise_tags():
    from mergelab.lab import strip

    nb = strip(_markup_notebook())
    assert [course.tags(c) for c in nb.cells[3:]] == [["exercise"], ["solution"], ["solution"]]


STUDENT_CHAPTER = "03_task_singular_vectors"  # among the cheapest chapters at smoke; its first exercise is code


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_a_student_notebook_runs_at_smoke_up_to_its_first_stub(tmp_path, monkeypatch):
    """The student version of a chapter, executed at smoke with the runner, stops at the first exercise
    left to write, with the stub's message; every cell before it ran without error."""
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(smoke_data_dir()))  # the smoke book's cache, built once per session
    solution = chapter(STUDENT_CHAPTER)
    student = course.student_notebook(solution, STUDENT_CHAPTER)
    first = next(i for i, c in enumerate(student.cells) if STUB.search(c.source))
    number = STUB.search(student.cells[first].source).group(1)
    (tmp_path / "students").mkdir()
    path = tmp_path / "students" / f"{STUDENT_CHAPTER}.ipynb"
    nbformat.write(student, path)
    with pytest.raises(report.ReportError, match=rf"NotImplementedError: Exercise {re.escape(number)}: write your "
                                                 "solution here"):
        report.execute_notebook(path, report.profile_params("smoke", STUDENT_CHAPTER), tmp_path)
    failed = nbformat.read(tmp_path / f"{STUDENT_CHAPTER}.failed.ipynb", as_version=4)
    check_stopped_at_first_stub(failed, student.cells[first].source, number)


def check_stopped_at_first_stub(failed: nbformat.NotebookNode, stub_source: str, number: str) -> None:
    """Papermill's failed notebook (it adds cells of its own): one error, with the first stub's message, raised
    in the stub's cell or in the first cell after it that calls the stubbed function (an exercise check);
    every code cell before it executed."""
    errors = [(c, o) for c in failed.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert len(errors) == 1, f"{len(errors)} cells failed, expected only the first stub"
    cell, error = errors[0]
    stub = next(i for i, c in enumerate(failed.cells) if c.source == stub_source)
    assert failed.cells.index(cell) >= stub, "the run failed before reaching the first stub"
    assert (error["ename"], error["evalue"]) == ("NotImplementedError", f"Exercise {number}: write your solution here")
    before = [c for c in failed.cells[:failed.cells.index(cell)] if c.cell_type == "code" and c.source.strip()]
    assert before and all(c.get("execution_count") for c in before), "a cell before the stub did not run"


# --- the book ---------------------------------------------------------------------------------------


def test_quarto_path_gets_callouts_and_folded_solutions_and_the_pandoc_path_undoes_them():
    nb = _markup_notebook("x = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION")
    original = [c.source for c in nb.cells]
    assert for_quarto(nb) and for_quarto(nb)  # idempotent: rewrites from the kept source each time
    exercise, code, prose = nb.cells[3:]
    assert exercise.source.startswith('::: {.callout-note .exercise icon="false"}\n## Exercise 3.1: a title')
    assert exercise.source.endswith("\n:::")
    assert prose.source.startswith('::: {.callout-tip .solution collapse="true"}\n## Solution to exercise 3.1\n')
    assert code.source == '#| code-fold: true\n#| code-summary: "Solution code (exercise 3.1)"\nx = 1\ny = 2'
    prepared = prepare_notebook(nb)
    assert [c.source for c in prepared.cells if c.cell_type == "markdown"][-2:] == [original[3], original[5]]
    assert "x = 1\ny = 2" in [c.source for c in prepared.cells]  # the markers go, the code stays
    assert [c.source for c in restore(nb).cells] == original


def test_teacher_page_lists_every_chapter_with_its_measured_time_from_the_record():
    record = read_record(ROOT / "reports" / RECORD)
    assert record is not None, f"reports/{RECORD} (the measured tiny timings) is not committed"
    assert record["profile"] == "tiny"
    template = (ROOT / "reports" / TEMPLATE).read_text()
    assert MARKER in template
    for needed in ("make student", "make report", "docs/clip.md", "PROFILE=clip", "## Prerequisites",
                   "## Learning goals per chapter"):
        assert needed in template, needed
    chapters = report.book_chapters(ROOT / "reports" / "_quarto.yml")
    assert "teaching.qmd" in chapters
    notebooks = [c for c in chapters if c.endswith(".ipynb")]
    found = {Path(c).stem: course.exercises(chapter(Path(c).stem), Path(c).stem) for c in notebooks}
    page = teaching_markdown(template, record, chapters, {}, found)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| \d+ \| \S+ \(`(\d\d)`\) \| ([^|]+) \|", page, re.MULTILINE)}
    assert sorted(rows) == sorted(Path(c).stem[:2] for c in notebooks)
    for timing in record["chapters"]:
        seconds = timing["wall_s"]
        shown = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
        assert rows[timing["notebook"][:2]].strip() == shown
        assert timing["machine"]["cpu_model"] in page and timing["started_utc"][:10] in page
        assert {"load_average_start", "cache", "machine"} <= set(timing)
    assert "not measured" not in page or any(Path(c).stem not in {t["notebook"] for t in record["chapters"]}
                                             for c in notebooks)


def test_session_table_says_when_nothing_was_measured():
    text = sessions_markdown(None, ["00_a.ipynb"], {"00_a": "Alpha"}, {})
    assert "| 1 | Alpha (`00`) | not measured |" in text and "No timing record" in text
    one = {"profile": "tiny", "chapters": [{"notebook": "00_a", "wall_s": 125.0, "cache": "warm", "started_utc": "2026-12-03T19:00:00Z",
                                            "load_average_start": [3.5, 3, 2], "machine": {"cpu_model": "CPU X", "cores": 2,
                                                                                           "system": "Linux"}}]}
    text = sessions_markdown(one, ["00_a.ipynb"], {"00_a": "Alpha"}, {})
    assert "| 1 | Alpha (`00`) | 2.1 min | warm | 3.5 | not recorded |" in text and "CPU X (2 cores" in text
    assert "2026-12-03" in text and "of CPU time" not in text  # records made before CPU time was measured
    one["chapters"][0]["cpu_s"] = 230.0
    text = sessions_markdown(one, ["00_a.ipynb"], {"00_a": "Alpha"}, {})
    assert "| 1 | Alpha (`00`) | 2.1 min | warm | 3.5 | 3.8 min |" in text and "3.8 min of CPU time" in text
    # two lanes on 2 cores, with a chapter's worker processes: up to about 4 is the book's own work
    assert "other work" not in text and "the machine did nothing else of note" in text  # 3.5 on 2 cores
    one["chapters"][0]["load_average_start"] = [5.2, 4, 3]
    text = sessions_markdown(one, ["00_a.ipynb"], {"00_a": "Alpha"}, {})
    assert "so other work shared the machine" in text  # 5.2 on 2 cores


def test_quarto_rewrite_happens_in_place_once_before_quarto_renders(tmp_path):
    from mergelab.report.book import quarto_exercises

    nbformat.write(_markup_notebook(), tmp_path / "03_x.ipynb")
    assert quarto_exercises(tmp_path, ["index.qmd", "03_x.ipynb", "04_missing.ipynb"]) == [tmp_path / "03_x.ipynb"]
    once = (tmp_path / "03_x.ipynb").read_text()
    quarto_exercises(tmp_path, ["03_x.ipynb"])
    assert (tmp_path / "03_x.ipynb").read_text() == once and "callout-note" in once
    nb = nbformat.read(tmp_path / "03_x.ipynb", as_version=4)
    assert [c.source for c in restore(nb).cells] == [c.source for c in _markup_notebook().cells]


def test_chapter_00s_exercise_check_accepts_the_norm_balanced_merge_and_rejects_other_rules():
    """The contract alone holds for plain task arithmetic too: the exercise's own check tells them apart."""
    from mergelab.experiments.ch00_benchmark import check_norm_balanced
    from mergelab.merging import assemble, merge, validate

    def rule(scale):
        def merged(pretrained, task_vectors, coefficient=0.3):
            keys = validate(pretrained, task_vectors)
            norms = [float(tv.norm()) for tv in task_vectors]
            s = [scale(n, norms) for n in norms]
            return assemble(pretrained, keys, lambda k: coefficient * sum(w * tv[k] for w, tv in zip(s, task_vectors)))
        return merged

    mean = lambda norms: sum(norms) / len(norms)  # noqa: E731
    check_norm_balanced(rule(lambda n, ns: mean(ns) / n if n > 0 else 0.0))  # the exercise's rule
    wrong = {"plain task arithmetic": lambda p, t, coefficient=0.3: merge("task_arithmetic", p, t, coefficient=coefficient),
             "scaled to the largest norm": rule(lambda n, ns: max(ns) / n if n > 0 else 0.0),
             "scaled the other way": rule(lambda n, ns: n / mean(ns) if mean(ns) > 0 else 0.0)}
    for what, fn in wrong.items():
        with pytest.raises(AssertionError, match="must each be scaled to their mean norm 2"):
            check_norm_balanced(fn)
