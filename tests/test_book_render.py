"""The book without Quarto (pandoc): cell options, figures, references, citations, math and parameters
are honoured, on a hand-made executed notebook (no kernel needed)."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from mergelab import report
from mergelab.report.pandoc_book import cell_options, prepare_notebook

pytestmark = pytest.mark.timeout(120)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
QUARTO_YML = """\
book:
  title: "A throwaway book"
  chapters: [index.qmd, 00_alpha.ipynb]
bibliography: references.bib
"""
BIB = "@article{doe2020alpha, title={Alpha}, author={Doe, Jane}, journal={J}, year={2020}}\n"


def executed_notebook() -> nbformat.NotebookNode:
    """What papermill leaves: a tagged parameters cell, the injected one after it, outputs."""
    return new_notebook(cells=[
        new_markdown_cell("# Alpha chapter\n\nAs @fig-alpha shows [@doe2020alpha], $\\tau_t = \\theta_t - \\theta_0$.\n\n"
                          "$$\\sum_t \\tau_t$$"),
        new_code_cell("value = 1  # the default", metadata={"tags": ["parameters"]}),
        new_code_cell("# Parameters\nvalue = 2\n", metadata={"tags": ["injected-parameters"]}),
        new_code_cell("#| echo: false\nhidden_switch_marker = 1\ndisplay(Markdown(text))", outputs=[
            new_output("display_data", data={"text/markdown": "Prose from the run, see @fig-alpha and [@doe2020alpha].",
                                             "text/plain": "<IPython.core.display.Markdown object>"})]),
        new_code_cell('#| label: fig-alpha\n#| fig-cap: "A *small* figure."\nshown_code_marker = 1', outputs=[
            new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure size 10x10>"}),
            new_output("stream", name="stderr", text="a warning on stderr\n")]),
        new_code_cell("print_provenance()", outputs=[new_output("stream", name="stdout", text="line\n" * 40)]),
        new_markdown_cell("## Exercises"),
        new_markdown_cell("### Exercise 0.1: write a rule\n\n*Implement.* Write it.", metadata={"tags": ["exercise"]}),
        new_code_cell("kept_line = 1\n### BEGIN SOLUTION\nsolution_code_marker = 2\n### END SOLUTION",
                      metadata={"tags": ["solution"]}, outputs=[
                          new_output("stream", name="stdout", text="solved\n"),
                          new_output("display_data", data={"text/markdown": "Solution prose one marker.", "text/plain": ""}),
                          new_output("display_data", data={"text/markdown": "Solution prose two marker.", "text/plain": ""}),
                          new_output("execute_result", data={"text/plain": "solution_table_marker"}, execution_count=3)]),
        new_code_cell("check_marker()", metadata={"tags": ["exercise-check"]}),
        new_markdown_cell("### Exercise 0.2: read a figure\n\n*Interpret.* Read it.", metadata={"tags": ["exercise"]}),
        new_markdown_cell("Solution prose marker.", metadata={"tags": ["solution"]}),
    ], metadata={"kernelspec": {"name": "mergelab", "display_name": "Python (mergelab)", "language": "python"},
                 "papermill": {"parameters": {"value": 2, "profile": "smoke"}}})


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reports = tmp_path_factory.mktemp("book")
    (reports / "_quarto.yml").write_text(QUARTO_YML)
    (reports / "index.qmd").write_text("---\ntitle: A throwaway book\n---\n\n# Preface {.unnumbered}\n\nHi [@doe2020alpha].\n")
    (reports / "references.bib").write_text(BIB)
    nbformat.write(executed_notebook(), reports / "00_alpha.ipynb")
    index, used = report.render_book(reports, reports / "_quarto.yml", "pandoc")
    assert used == "pandoc" and index == reports / "_book" / "index.html"
    return index.parent


def test_cell_options_are_read_and_removed() -> None:
    assert cell_options('#| label: fig-x\n#| fig-cap: "A: b"\ncode()') == ({"label": "fig-x", "fig-cap": "A: b"}, "code()")
    assert cell_options("code()  #| not an option") == ({}, "code()  #| not an option")


def test_echo_false_hides_code_and_other_code_is_folded(book: Path) -> None:
    page = (book / "00_alpha.html").read_text()
    assert "hidden_switch_marker" not in page
    fold = page.index('<details class="code-fold">')
    assert fold < page.index("shown_code_marker") < page.index("</details>", fold)
    assert "#|" not in page and "a warning on stderr" not in page
    assert '<details class="long-output"><summary>Printed output (40 lines)</summary>' in page  # the provenance, folded


def test_parameters_cells_are_hidden_and_their_values_shown_once(book: Path) -> None:
    page = (book / "00_alpha.html").read_text()
    assert "value = 1" not in page and "value = 2" not in page and "# Parameters" not in page
    assert page.count('<details class="parameters">') == 1
    assert "<td><code>value</code></td><td><code>2</code></td>" in page and "profile <code>smoke</code>" in page


def test_figures_are_numbered_and_referenced_by_links(book: Path) -> None:
    page = (book / "00_alpha.html").read_text()
    figure = re.search(r'<figure id="fig-alpha">(.*?)</figure>', page, re.DOTALL)
    assert figure, "the labelled cell's image is not a figure with the label as id"
    assert re.search(r"<figcaption>.*Figure 0\.1:.*A\s+<em>small</em>\s+figure\.", figure.group(1), re.DOTALL)
    img = re.search(r'<img src="([^"]+)"', figure.group(1)).group(1)
    assert (book / img).is_file()
    links = re.findall(r'<a href="#fig-alpha" class="fig-ref">Figure\s+0\.1</a>', page)
    assert len(links) == 2  # in the text and in the prose printed by a cell
    assert "@fig-" not in page


def test_citations_and_math_are_rendered_offline(book: Path) -> None:
    page = (book / "00_alpha.html").read_text()
    assert "[@" not in page and "$\\" not in page and "IPython.core.display.Markdown" not in page
    assert page.count('href="#ref-doe2020alpha"') == 2 and 'id="ref-doe2020alpha"' in page  # a reference list per chapter
    assert '<math display="inline"' in page and '<math display="block"' in page
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?:', page)  # nothing fetched from the web
    assert '<span class="chapter-number">0</span>' in page  # the notebook's own number (00_alpha)


def test_every_page_links_every_chapter_and_its_neighbours(book: Path) -> None:
    index, chapter = (book / "index.html").read_text(), (book / "00_alpha.html").read_text()
    for page in (index, chapter):
        assert 'href="index.html"' in page and 'href="00_alpha.html"' in page
    assert '<a rel="next" href="00_alpha.html">' in index and '<a rel="prev" href="index.html">' in chapter
    assert "Preface" in index and "{.unnumbered}" not in index


def test_prepare_notebook_turns_markdown_outputs_into_text() -> None:
    nb = prepare_notebook(executed_notebook())
    kinds = [(c.cell_type, c.metadata.get("echo", True)) for c in nb.cells]
    assert kinds[:6] == [("markdown", True), ("raw", True), ("code", False), ("markdown", True), ("code", True), ("code", True)]
    assert nb.cells[3].source.startswith("Prose from the run")
    assert nb.cells[4].metadata["label"] == "fig-alpha" and nb.cells[4].source == "shown_code_marker = 1"


def test_savefig_returns_nothing_printable(tmp_path: Path) -> None:
    """A cell ending with ``plotting.savefig(...)`` prints no ``PosixPath(...)`` under its figure."""
    from mergelab import plotting

    fig, _ = plotting.figure()
    assert plotting.savefig(fig, "x", tmp_path) is None
    assert plotting.figure_path("x", tmp_path).is_file() and plotting.figure_path("x", tmp_path) == tmp_path / "x.png"
    assert plotting.figure_path("x", tmp_path).read_bytes().startswith(b"\x89PNG")  # a PNG, whatever the temp name


def test_an_interrupted_savefig_leaves_the_previous_figure_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab import plotting

    fig, _ = plotting.figure()
    plotting.savefig(fig, "x", tmp_path)
    before = (tmp_path / "x.png").read_bytes()

    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fig, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plotting.savefig(fig, "x", tmp_path)
    assert (tmp_path / "x.png").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.notebook
def test_in_a_kernel_a_saved_figure_is_drawn_once_and_shown_as_the_saved_file_where_the_cell_ends(tmp_path: Path) -> None:
    """Jupyter's inline backend drew every figure a second time after :func:`plotting.savefig` had drawn it (a
    quarter of a smoke chapter's CPU went to figures). Now the saved PNG is what the cell shows, byte for byte,
    after the cell's own text and table as before, and the figure is not left open for the backend to draw again;
    a figure that is not saved is still shown by the backend."""
    import base64

    from nbformat.v4 import new_code_cell as code

    nb = new_notebook(cells=[code(
        "import matplotlib.pyplot as plt\n"
        "from IPython.display import Markdown, display\n"
        "from mergelab import plotting\n"
        "plotting.set_style()\n"
        "fig, ax = plotting.figure()\n"
        "ax.plot([0, 1], [1, 0])\n"
        f"plotting.savefig(fig, 'line', {str(tmp_path / 'figures')!r})\n"
        "display(Markdown('text after the figure call'))\n"
        "open_figures = len(plt.get_fignums())\n"
        "open_figures"), code("fig2, ax2 = plotting.figure()\nax2.plot([0, 1], [0, 1]);")],
        metadata={"kernelspec": {"name": "mergelab", "display_name": "Python (mergelab)", "language": "python"}})
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nbformat.write(nb, notebooks / "fig.ipynb")
    (tmp_path / "out").mkdir()
    report.execute_notebook(notebooks / "fig.ipynb", {}, tmp_path / "out")
    executed = nbformat.read(tmp_path / "out" / "fig.ipynb", as_version=4)
    first, second = [c.outputs for c in executed.cells if c.cell_type == "code"][-2:]
    kinds = [("image" if "image/png" in o.get("data", {}) else o["output_type"]) for o in first]
    assert kinds == ["display_data", "execute_result", "image"], first  # text, table, then the figure: as before
    assert first[1]["data"]["text/plain"] == "0"  # closed once saved: the backend has nothing left to draw again
    shown = base64.b64decode(first[2]["data"]["image/png"])
    assert shown == (tmp_path / "figures" / "line.png").read_bytes()
    assert [o for o in second if "image/png" in o.get("data", {})]  # an unsaved figure: the backend shows it


def test_exercises_are_numbered_callouts_with_their_solutions_folded_under_them(book: Path) -> None:
    page = (book / "00_alpha.html").read_text()
    callouts = re.findall(r'<div id="(exercise-[\d-]+)" class="callout callout-exercise" role="note">\s*<section[^>]*>\s*'
                          r"<h3>(Exercise [\d.]+: [^<]+)</h3>", page)
    assert callouts == [("exercise-0-1", "Exercise 0.1: write a rule"), ("exercise-0-2", "Exercise 0.2: read a figure")]
    folds = re.findall(r'<details class="solution"><summary>Solution to exercise ([\d.]+)</summary>(.*?)</details>\s*(?=<|$)',
                       page, re.DOTALL)
    assert [n for n, _ in folds] == ["0.1", "0.2"]
    assert "solution_code_marker" in folds[0][1] and "solved" in folds[0][1] and "code-fold" not in folds[0][1]
    # what a solution prints (its Markdown prose, a table) stays in its one fold, in order, with no empty piece
    body = folds[0][1]
    assert body.index("solved") < body.index("Solution prose one marker.") < body.index("Solution prose two marker.") \
        < body.index("solution_table_marker")
    assert not re.search(r'<div[^>]*class="cell code"[^>]*>\s*</div>', body)
    assert "Solution prose marker." in folds[1][1]
    assert "BEGIN SOLUTION" not in page and "END SOLUTION" not in page and "kept_line" in folds[0][1]
    check = page.index("check_marker")
    assert page.index("</details>", page.index("solution_code_marker")) < check < page.index("exercise-0-2")  # not folded with the solution


def test_every_reference_of_the_book_names_its_authors() -> None:
    """An entry without ``author`` is cited by its venue ("(International Conference on ... 2026)") instead of
    its authors, in the pandoc book and in Quarto's alike."""
    bib = (Path(__file__).resolve().parents[1] / "reports" / "references.bib").read_text(encoding="utf-8")
    entries = re.split(r"\n(?=@)", bib.strip())
    assert len(entries) >= 10
    for entry in entries:
        key = re.match(r"@\w+\{([^,\s]+),", entry)
        assert key, entry[:80]
        assert re.search(r"^\s*author\s*=\s*\{\s*\S", entry, re.MULTILINE), f"{key.group(1)} has no author"


# a 2x1 PNG: another figure than PNG's 1x1
OTHER_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAABCAYAAAD0In+KAAAAEUlEQVR42mNk+M9QzwAEjDAGACCDAv8cI7IoAAAAAElFTkSuQmCC"


def test_a_render_again_replaces_each_page_whole_and_drops_figures_no_page_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chapter whose figure changed renders to a page naming the new figure's file, the old one removed; a
    render cut short (pandoc failing) leaves the last page and its figures as they were, and no partial page."""
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "_quarto.yml").write_text(QUARTO_YML)
    (reports / "index.qmd").write_text("---\ntitle: A throwaway book\n---\n\n# Preface {.unnumbered}\n\nHi.\n")
    (reports / "references.bib").write_text(BIB)
    nbformat.write(executed_notebook(), reports / "00_alpha.ipynb")
    report.render_book(reports, reports / "_quarto.yml", "pandoc")
    book = reports / "_book"

    def figures() -> list[str]:
        page = (book / "00_alpha.html").read_text()
        return re.findall(r'<img src="([^"]+)"', page)

    first = figures()
    assert len(first) == 1 and (book / first[0]).is_file()
    nb = executed_notebook()
    nb.cells[4].outputs[0]["data"]["image/png"] = OTHER_PNG
    nbformat.write(nb, reports / "00_alpha.ipynb")
    report.render_book(reports, reports / "_quarto.yml", "pandoc")
    second = figures()
    assert len(second) == 1 and second != first and (book / second[0]).is_file()
    assert not (book / first[0]).exists()
    assert [p.name for p in (book / "media" / "00_alpha").rglob("*") if p.is_file()] == [Path(second[0]).name]
    page = (book / "00_alpha.html").read_text()

    import subprocess

    real_run = subprocess.run

    def cut_short(args, **kwargs):  # pandoc writes half a page for the chapter, then fails
        if "00_alpha" in " ".join(map(str, args)):
            out = Path(kwargs["cwd"]) / args[args.index("--output") + 1]
            out.write_text("<html><body>half a pa")
            return subprocess.CompletedProcess(args, 1, "", "killed")
        return real_run(args, **kwargs)

    files = sorted(p.relative_to(book) for p in book.rglob("*"))
    monkeypatch.setattr(subprocess, "run", cut_short)
    nbformat.write(executed_notebook(), reports / "00_alpha.ipynb")
    with pytest.raises(Exception, match="pandoc could not render 00_alpha.ipynb"):
        report.render_book(reports, reports / "_quarto.yml", "pandoc")
    assert (book / "00_alpha.html").read_text() == page and (book / second[0]).is_file()
    assert not [p.name for p in book.iterdir() if p.name.endswith(".part")]
    assert sorted(p.relative_to(book) for p in book.rglob("*")) == files  # no partial page or temporary file left
