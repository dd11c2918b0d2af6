"""Tests of the report runner (`mergelab.report`) on a throwaway project in a temporary folder.

The notebooks run for real, through papermill and the project's "mergelab" kernel, so these tests
need `make env` (or the `ipykernel install` line of the Makefile) to have been run once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mergelab import paths, report

pytestmark = pytest.mark.timeout(120)

PROFILE = "smoke"
QUARTO_YML = """\
project:
  type: book
  output-dir: _book
book:
  title: "A throwaway book"
  chapters:
    - index.qmd
    - 00_alpha.ipynb
bibliography: references.bib
"""
INDEX_QMD = """\
---
title: "A throwaway book"
---

# Preface {.unnumbered}

Some *introduction*, as in @doe2020alpha and [@doe2020alpha].
"""
REFERENCES_BIB = """\
@inproceedings{doe2020alpha,
  title     = {{Alpha}: A Study of {R}odol{\\`a} Merging},
  author    = {Doe, Jane and Roe, Richard},
  booktitle = {A Conference},
  year      = {2020}
}
"""


def write_notebook(path: Path, title: str, body: str) -> None:
    """A notebook with a title, a `parameters` cell (`value`) and a body cell."""
    nb = new_notebook(
        cells=[
            new_markdown_cell(f"# {title}\n\nA throwaway notebook."),
            new_code_cell("value = 1  # the number to write", metadata={"tags": ["parameters"]}),
            new_code_cell(body),
        ],
        metadata={"kernelspec": {"name": paths.KERNEL_NAME, "display_name": "Python (mergelab)"}},
    )
    nbformat.write(nb, path)


WRITE_RESULT = (
    "import json\n"
    "from mergelab.paths import results_dir\n"
    "(results_dir() / '00_alpha.json').write_text(json.dumps({'value': value}))"
)


def make_project(root: Path) -> dict[str, Path]:
    """notebooks/, params/smoke/, book/_quarto.yml (+ index.qmd), src/ and an output folder."""
    (root / "notebooks").mkdir(parents=True)
    write_notebook(root / "notebooks" / "00_alpha.ipynb", "Alpha chapter", WRITE_RESULT)
    (root / "params" / PROFILE).mkdir(parents=True)
    (root / "params" / PROFILE / "00_alpha.yaml").write_text("value: 2\n")
    (root / "book").mkdir()
    (root / "book" / "_quarto.yml").write_text(QUARTO_YML)
    (root / "book" / "index.qmd").write_text(INDEX_QMD)
    (root / "book" / "references.bib").write_text(REFERENCES_BIB)
    (root / "src").mkdir()
    (root / "src" / "module.py").write_text("X = 1\n")
    return {"root": root, "out": root / "out"}


def build(root: Path, **kwargs) -> report.ReportResult:
    """`build_report` on the throwaway project, with the pandoc renderer (Quarto is never required)."""
    options = dict(
        profile=PROFILE,
        reports=root / "out",
        notebooks_dir=root / "notebooks",
        params_dir=root / "params",
        quarto_yml=root / "book" / "_quarto.yml",
        source_dir=root / "src",
        renderer="pandoc",
    )
    options.update(kwargs)
    return report.build_report(**options)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, report.ReportResult]:
    """The throwaway project after one run (executes the notebook once for the whole module)."""
    root = tmp_path_factory.mktemp("project")
    make_project(root)
    return root, build(root)


def test_first_run_executes_and_writes_results(executed: tuple[Path, report.ReportResult]) -> None:
    root, result = executed
    assert result.statuses == {"00_alpha": report.EXECUTED}
    assert result.renderer == "pandoc"
    assert (root / "out" / "00_alpha.ipynb").is_file()
    assert json.loads((root / "out" / "results" / "00_alpha.json").read_text()) == {"value": 2}
    assert report.stamp_path(root / "out", "00_alpha", PROFILE).is_file()
    assert not list((root / "out").glob("*.failed.ipynb"))
    assert not list((root / "out").glob(".*.running.ipynb"))


def test_each_execution_leaves_a_timing_record(executed: tuple[Path, report.ReportResult]) -> None:
    root, _ = executed
    timing = json.loads((root / "out" / "timings" / f"00_alpha.{PROFILE}.json").read_text())
    assert timing["notebook"] == "00_alpha" and timing["profile"] == PROFILE and timing["wall_s"] > 0
    assert timing["cpu_s"] > 0  # at least the kernel's start
    assert timing["machine"]["cores"] == os.cpu_count() and timing["machine"]["cpu_model"]
    assert timing["cache"] in ("cold", "warm") and len(timing["load_average_start"]) == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", timing["started_utc"])


def test_a_run_that_writes_into_the_data_cache_is_cold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab.report.timings import Stopwatch, write_record

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "old.bin").write_bytes(b"x")
    with Stopwatch() as watch:
        (tmp_path / "data" / "old.bin").read_bytes()
    assert watch.record("a", "tiny")["cache"] == "warm"
    with Stopwatch() as watch:
        (tmp_path / "data" / "experts").mkdir()
        (tmp_path / "data" / "experts" / "new.bin").write_bytes(b"y")
    record = watch.record("00_a", "tiny")
    assert record["cache"] == "cold" and record["cache_files_written"] == 1
    from mergelab.report.timings import write_timing

    write_timing(tmp_path / "rep", record)
    out = write_record(tmp_path / "rep", tmp_path / "record.json", note="a test")
    assert json.loads(out.read_text())["chapters"] == [record]
    with pytest.raises(ValueError, match="no timing records of profile 'smoke'"):
        write_record(tmp_path / "rep", tmp_path / "record.json", profile="smoke")


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
"""A child that spends ``s`` seconds of CPU time."""


def test_stopwatch_counts_the_cpu_of_children_not_of_lanes_reaped_meanwhile(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from mergelab.report.timings import Stopwatch, run_child

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    with Stopwatch() as watch:  # a notebook's kernel: a child that burns 0.3 CPU s and is waited for
        subprocess.run([sys.executable, "-c", BURN.format(s=0.3)], check=True)
    first = watch.record("00_a", "tiny")["cpu_s"]
    assert 0.3 <= first < 2.5  # the burn, and the interpreter's start
    with Stopwatch() as watch:  # the same beside a lane of 1 CPU s that ends meanwhile
        code, lane_cpu = run_child([sys.executable, "-c", BURN.format(s=1.0)])
        subprocess.run([sys.executable, "-c", BURN.format(s=0.3)], check=True)
    beside = watch.record("00_a", "tiny")["cpu_s"]
    assert code == 0 and 1.0 <= lane_cpu < 3.0
    assert abs(beside - first) < 0.5  # the lane's 1 CPU s is not the chapter's
    code, _ = run_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert code == 3  # the exit status as subprocess.run gives it


def test_book_index_links_every_chapter(executed: tuple[Path, report.ReportResult]) -> None:
    root, result = executed
    index = result.book
    assert index == root / "out" / "_book" / "index.html"
    text = index.read_text()
    for chapter in report.book_chapters(root / "book" / "_quarto.yml"):
        page = Path(chapter).with_suffix(".html").name
        assert f'href="{page}"' in text
        assert (index.parent / page).is_file()
    assert "Alpha chapter" in text  # chapter title = first heading of the notebook
    assert "<em>introduction</em>" in text  # index.qmd rendered from Markdown
    assert "{.unnumbered}" not in text and "title:" not in text
    # citations resolved from references.bib by pandoc's citeproc, linked to a reference list
    assert "[@" not in text and "@doe2020alpha" not in text
    assert text.count('href="#ref-doe2020alpha"') == 2
    plain = " ".join(re.sub(r"<[^>]+>", "", text).split())  # the text a reader sees
    assert 'id="ref-doe2020alpha"' in text and "Alpha: A Study of Rodolà Merging" in plain
    assert "Doe and Roe (2020)" in plain and "(Doe and Roe 2020)" in plain
    chapter = (index.parent / "00_alpha.html").read_text()
    assert 'href="index.html"' in chapter  # navigation back to the contents
    assert '<span class="chapter-number">0</span>' in chapter  # the notebook's own number, as its text uses it
    # the parameters cells are hidden; the values the run used are shown once, folded
    assert "value = 1" not in chapter and "injected" not in chapter.lower()
    assert '<details class="parameters">' in chapter and "<td><code>value</code></td><td><code>2</code></td>" in chapter


def test_project_files_copied_next_to_the_book(executed: tuple[Path, report.ReportResult]) -> None:
    root, _ = executed
    for name in report.PROJECT_FILES:
        assert (root / "out" / name).read_bytes() == (root / "book" / name).read_bytes()


def test_second_run_is_up_to_date_and_params_change_reruns(
    executed: tuple[Path, report.ReportResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(executed[0], tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    stamp = report.stamp_path(out, "00_alpha", PROFILE)
    before = (stamp.stat().st_mtime_ns, (out / "00_alpha.ipynb").stat().st_mtime_ns)

    again = build(tmp_path)
    assert again.statuses == {"00_alpha": report.UP_TO_DATE}
    assert "up to date: 00_alpha" in capsys.readouterr().out
    assert (stamp.stat().st_mtime_ns, (out / "00_alpha.ipynb").stat().st_mtime_ns) == before

    (tmp_path / "params" / PROFILE / "00_alpha.yaml").write_text("value: 3\n")
    changed = build(tmp_path)
    assert changed.statuses == {"00_alpha": report.EXECUTED}
    assert json.loads((out / "results" / "00_alpha.json").read_text()) == {"value": 3}


def test_content_hash_covers_notebook_params_profile_and_sources(tmp_path: Path) -> None:
    make_project(tmp_path)
    nb = tmp_path / "notebooks" / "00_alpha.ipynb"
    params = tmp_path / "params" / PROFILE / "00_alpha.yaml"
    src = tmp_path / "src"
    base = report.content_hash(nb, params, PROFILE, src)
    assert report.content_hash(nb, params, PROFILE, src) == base
    assert report.content_hash(nb, params, "tiny", src) != base
    (src / "module.py").write_text("X = 2\n")
    assert report.content_hash(nb, params, PROFILE, src) != base
    before = report.content_hash(nb, params, PROFILE, src)
    (src / "sub").mkdir()
    (src / "sub" / "extra.py").write_text("")
    changed = report.content_hash(nb, params, PROFILE, src)
    assert changed != before  # a module added in a subpackage
    params.write_text("value: 5\n")
    assert report.content_hash(nb, params, PROFILE, src) != changed
    edited = report.content_hash(nb, params, PROFILE, src)
    nb.write_text(nb.read_text().replace("Alpha", "Alpha, edited"))  # the notebook itself
    assert report.content_hash(nb, params, PROFILE, src) != edited
    edited = report.content_hash(nb, params, PROFILE, src)
    (params.parent / "_benchmark.yaml").write_text("benchmark: tiny\n")  # the profile's benchmark block
    assert report.content_hash(nb, params, PROFILE, src) != edited
    # the data the package ships (weights, their logs) is part of it; other files and caches are not
    (src / "weights").mkdir()
    (src / "weights" / "expert.safetensors").write_bytes(b"\x00")
    shipped = report.content_hash(nb, params, PROFILE, src)
    assert report.content_hash(nb, params, PROFILE, src) == shipped
    (src / "weights" / "expert.safetensors").write_bytes(b"\x01")
    assert report.content_hash(nb, params, PROFILE, src) != shipped
    reshipped = report.content_hash(nb, params, PROFILE, src)
    (src / "weights" / "expert.json").write_text("{}")
    assert report.content_hash(nb, params, PROFILE, src) != reshipped
    logged = report.content_hash(nb, params, PROFILE, src)
    (src / "notes.txt").write_text("x")
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "module.cpython-311.json").write_text("{}")
    assert report.content_hash(nb, params, PROFILE, src) == logged


def test_content_hash_covers_the_settings_that_change_what_a_chapter_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported experts (``MERGELAB_CLIP_EXPERTS_DIR``), the datasets' folder and the tiny size's train-here switches
    rerun a chapter: without them, a clip book made with fine-tuned experts stays "up to date" once experts are
    imported, and keeps the old numbers."""
    from mergelab.benchmarks.tiny.ship import ENV_FINETUNE, ENV_PRETRAIN
    from mergelab.report.stamps import INPUT_VARIABLES

    assert {ENV_FINETUNE, ENV_PRETRAIN} <= set(INPUT_VARIABLES)
    make_project(tmp_path)
    nb, params, src = tmp_path / "notebooks" / "00_alpha.ipynb", tmp_path / "params" / PROFILE / "00_alpha.yaml", tmp_path / "src"
    for var in INPUT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    seen = {report.content_hash(nb, params, PROFILE, src)}
    experts = tmp_path / "experts"
    (experts / "MNIST").mkdir(parents=True)
    (experts / "MNIST" / "model.safetensors").write_bytes(b"\x00")
    for var, value in (("MERGELAB_CLIP_EXPERTS_DIR", str(experts)), ("MERGELAB_CLIP_DATA_ROOT", str(tmp_path)),
                       (ENV_PRETRAIN, "1"), (ENV_FINETUNE, "1")):
        monkeypatch.setenv(var, value)
        digest = report.content_hash(nb, params, PROFILE, src)
        assert digest not in seen, var
        seen.add(digest)
    (experts / "MNIST" / "model.safetensors").write_bytes(b"\x00\x01")  # a checkpoint written again
    assert report.content_hash(nb, params, PROFILE, src) not in seen
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGELAB_CLIP_EXPERTS_DIR", "experts")  # the same folder, named relatively
    relative = report.content_hash(nb, params, PROFILE, src)
    monkeypatch.setenv("MERGELAB_CLIP_EXPERTS_DIR", str(experts))
    assert report.content_hash(nb, params, PROFILE, src) == relative


def test_missing_params_file_names_the_expected_path(tmp_path: Path) -> None:
    make_project(tmp_path)
    expected = tmp_path / "params" / PROFILE / "00_alpha.yaml"
    expected.unlink()
    with pytest.raises(report.ReportError) as err:
        build(tmp_path)
    message = str(err.value)
    assert str(expected) in message and "00_alpha" in message and repr(PROFILE) in message
    assert not (tmp_path / "out" / "00_alpha.ipynb").exists()


def test_notebook_missing_from_chapters_is_refused(tmp_path: Path) -> None:
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "01_beta.ipynb", "Beta", "pass")
    with pytest.raises(report.ReportError, match=r"01_beta\.ipynb.*book\.chapters") as err:
        build(tmp_path)
    assert str(tmp_path / "book" / "_quarto.yml") in str(err.value)


def test_failing_notebook_is_kept_and_leaves_no_stamp(tmp_path: Path) -> None:
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "Alpha chapter", "raise ValueError('boom')")
    with pytest.raises(report.ReportError, match=r"00_alpha\.ipynb.*ValueError.*boom"):
        build(tmp_path)
    out = tmp_path / "out"
    assert (out / "00_alpha.failed.ipynb").is_file()
    assert not (out / "00_alpha.ipynb").exists()
    assert not report.stamp_path(out, "00_alpha", PROFILE).exists()
    assert not list(out.glob(".*.running.ipynb"))


def test_a_failed_run_leaves_no_earlier_run_up_to_date(tmp_path: Path) -> None:
    """A chapter writes its results part-way through: a run that fails after that (here under another profile)
    must not leave the earlier executed notebook counted as up to date, nor its results beside that notebook: the
    results file the notebook goes with is put back."""
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "Alpha chapter",
                   WRITE_RESULT + "\nassert value != 7, 'fails after writing its results'")
    out = tmp_path / "out"
    assert build(tmp_path).statuses == {"00_alpha": report.EXECUTED}
    (tmp_path / "params" / "other").mkdir()
    (tmp_path / "params" / "other" / "00_alpha.yaml").write_text("value: 7\n")
    with pytest.raises(report.ReportError, match="fails after writing its results"):
        build(tmp_path, profile="other")
    assert json.loads((out / "results" / "00_alpha.json").read_text()) == {"value": 2}  # the executed notebook's
    assert sorted(p.name for p in (out / "results").iterdir()) == ["00_alpha.json"]  # no copy left behind
    assert (out / "00_alpha.failed.ipynb").is_file()
    assert build(tmp_path).statuses == {"00_alpha": report.EXECUTED}  # not "up to date": it runs again
    assert json.loads((out / "results" / "00_alpha.json").read_text()) == {"value": 2}


def test_a_first_run_that_fails_after_writing_its_results_leaves_none(tmp_path: Path) -> None:
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "Alpha chapter",
                   WRITE_RESULT + "\nraise ValueError('after the results')")
    with pytest.raises(report.ReportError, match="after the results"):
        build(tmp_path)
    assert list((tmp_path / "out" / "results").iterdir()) == []  # the notebook wrote there; nothing is left


def test_a_reports_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    make_project(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    for reports in (tmp_path / "taken", tmp_path / "taken" / "inside"):
        with pytest.raises(report.ReportError, match=r"reports=.*is not a folder that can be made: .*taken is a file"):
            build(tmp_path, reports=reports)


def test_unknown_notebook_and_profile_are_clear_errors(tmp_path: Path) -> None:
    make_project(tmp_path)
    with pytest.raises(report.ReportError, match=r"no such notebook.*valid: 00_alpha"):
        report.discover_notebooks(tmp_path / "notebooks", ["99_missing"])
    with pytest.raises(report.ReportError, match="'huge' is not a parameter profile"):
        build(tmp_path, profile="huge")


def test_main_reports_errors_with_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_project(tmp_path)
    (tmp_path / "reports").mkdir()
    shutil.copy(tmp_path / "book" / "_quarto.yml", tmp_path / "reports" / "_quarto.yml")
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path))
    assert report.main(["--profile", "huge", "--reports", str(tmp_path / "out")]) == 1
    assert "huge" in capsys.readouterr().err


def test_chapters_are_flattened_from_parts(tmp_path: Path) -> None:
    quarto_yml = tmp_path / "_quarto.yml"
    quarto_yml.write_text(
        "book:\n  chapters:\n    - index.qmd\n    - part: Theory\n      chapters: [01_a.ipynb, 02_b.ipynb]\n"
        "  appendices: [99_z.ipynb]\n"
    )
    assert report.book_chapters(quarto_yml) == ["index.qmd", "01_a.ipynb", "02_b.ipynb", "99_z.ipynb"]


def test_one_notebook_into_a_fresh_folder_runs_it_and_waits_for_the_others_to_render(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "01_beta.ipynb", "Beta chapter", "pass")
    (tmp_path / "params" / PROFILE / "01_beta.yaml").write_text("value: 3\n")
    quarto_yml = tmp_path / "book" / "_quarto.yml"
    quarto_yml.write_text(QUARTO_YML.replace("    - 00_alpha.ipynb\n", "    - 00_alpha.ipynb\n    - 01_beta.ipynb\n"))
    result = build(tmp_path, names=["00_alpha"])
    assert result.statuses == {"00_alpha": report.EXECUTED}
    assert (result.book, result.renderer, result.missing) == (None, None, ["01_beta.ipynb"])
    assert "book not rendered" in capsys.readouterr().out
    assert not (tmp_path / "out" / "_book").exists()
    full = build(tmp_path)  # every chapter: 00_alpha is up to date, 01_beta runs, the book renders
    assert full.statuses == {"00_alpha": report.UP_TO_DATE, "01_beta": report.EXECUTED}
    assert full.book is not None and 'href="01_beta.html"' in full.book.read_text()


def test_kernel_talks_over_unix_sockets_and_removes_them(tmp_path: Path) -> None:
    """On POSIX the notebook's kernel uses the ``ipc`` transport (no unencrypted TCP port) with its
    sockets in Jupyter's runtime directory, not next to the notebook, and they are gone once the run
    ends; elsewhere it keeps jupyter_client's default TCP."""
    from jupyter_core.paths import jupyter_runtime_dir

    notebooks, reports = tmp_path / "notebooks", tmp_path / "out"
    notebooks.mkdir()
    reports.mkdir()
    write_notebook(notebooks / "00_alpha.ipynb", "Alpha chapter", (
        "import json, os\n"
        "from ipykernel import get_connection_info\n"
        "info = json.loads(get_connection_info())\n"
        "print(json.dumps({'transport': info['transport'], 'ip': info['ip'], 'cwd': os.listdir('.')}))"))
    report.execute_notebook(notebooks / "00_alpha.ipynb", {}, reports)
    printed = nbformat.read(reports / "00_alpha.ipynb", as_version=4).cells[-1].outputs[0]["text"]
    info = json.loads(printed)
    if os.name != "posix":
        assert info["transport"] == "tcp"
        return
    assert info["transport"] == "ipc"
    sockets = Path(info["ip"])  # the sockets are "<ip>-<n>"
    assert sockets.parent == Path(jupyter_runtime_dir())
    assert info["cwd"] == ["00_alpha.ipynb"]  # nothing of the kernel's next to the notebook
    assert not list(sockets.parent.glob(f"{sockets.name}-*"))
    assert not sockets.with_name(sockets.name.removesuffix("-ipc") + ".json").exists()  # the connection file


def test_ipc_transport_only_where_socket_paths_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import jupyter_core.paths

    monkeypatch.setattr(jupyter_core.paths, "jupyter_runtime_dir", lambda: "/run/user/1000/jupyter")
    manager = report.kernel_manager_class()
    assert (manager().transport if manager is not None else None) == ("ipc" if os.name == "posix" else None)
    long_dir = "/home/" + "x" * (report.UNIX_SOCKET_PATH_MAX - 50)
    monkeypatch.setattr(jupyter_core.paths, "jupyter_runtime_dir", lambda: long_dir)
    assert report.kernel_manager_class() is None


def test_parameters_are_checked_before_a_chapter_runs(tmp_path):
    from mergelab.params import ReportError, check_parameters

    nb = paths.notebooks_dir() / "00_benchmark_and_baselines.ipynb"
    good = report.profile_params("smoke", "00_benchmark_and_baselines")
    check_parameters(nb, good, "params/smoke")
    with pytest.raises(ReportError, match=r"params/smoke: 00_benchmark_and_baselines has no parameter 'head_shot'\. "
                                          r"Did you mean head_shots\?"):
        check_parameters(nb, {**good, "head_shot": 4}, "params/smoke")
    with pytest.raises(ReportError, match=r"parameter seed='abc' is a string; .* expects a number"):
        check_parameters(nb, {**good, "seed": "abc"}, "params/smoke")
    # a count (an integer default) refuses a float, which would fail far from the parameter file; a float
    # default takes a whole number
    with pytest.raises(ReportError, match=r"parameter multitask_steps=30\.0 is a float; .* expects an integer \(write 30;"):
        check_parameters(nb, {**good, "multitask_steps": 30.0}, "params/smoke")
    check_parameters(paths.notebooks_dir() / "05_merge3_irt.ipynb",
                     {**report.profile_params("smoke", "05_merge3_irt"), "coefficient_max": 1}, "params/smoke")
    bad = tmp_path / "p"
    bad.mkdir()
    (bad / "00_x.yaml").write_text("tasks: [digits\nseed: 1\n")
    with pytest.raises(ReportError, match=r"00_x.yaml is not valid YAML at line \d+"):
        report.load_params(bad / "00_x.yaml", "p", "00_x")


def test_exponent_floats_in_parameter_files_are_numbers(tmp_path):
    """``lr: 5e-4`` is what a researcher writes; YAML 1.1 (PyYAML's default) reads it as a string, which the
    training code would then compare with numbers. Parameter files read it as YAML 1.2 does: a float."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "00_x.yaml").write_text("finetune: {lr: 5e-4, weight_decay: 1E-1, steps: 300}\n"
                                      "alpha: -2e+1\nversion: v1e3\nname: 1e\nratio: 1.5\n")
    values = report.load_params(folder / "00_x.yaml", "p", "00_x")
    assert values["finetune"] == {"lr": 5e-4, "weight_decay": 0.1, "steps": 300}
    assert isinstance(values["finetune"]["lr"], float) and isinstance(values["finetune"]["steps"], int)
    assert values["alpha"] == -20.0 and values["version"] == "v1e3" and values["name"] == "1e" and values["ratio"] == 1.5


def test_clean_report_refuses_a_folder_of_committed_notebooks():
    import subprocess

    root = paths.project_root()
    before = sorted(p.name for p in (root / "notebooks").glob("*.ipynb"))
    run = subprocess.run(["make", "clean-report", "REPORTS=notebooks"], cwd=root, capture_output=True, text=True)
    assert run.returncode != 0 and "refusing to delete them" in run.stdout
    assert sorted(p.name for p in (root / "notebooks").glob("*.ipynb")) == before


def test_clean_cache_empties_the_data_folder_in_use_and_refuses_a_checkout(tmp_path: Path) -> None:
    """``make clean-cache`` with ``MERGELAB_DATA_DIR`` set empties that folder (not the checkout's ``data/``), and
    refuses a folder that is a checkout."""
    root = paths.project_root()
    cache = tmp_path / "cache"
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny" / "encoder.safetensors").write_bytes(b"\x00")
    (cache / "README.md").write_text("kept")
    env = {**os.environ, "MERGELAB_DATA_DIR": str(cache)}
    subprocess.run(["make", "--no-print-directory", "clean-cache"], cwd=root, env=env, capture_output=True, check=True)
    assert [p.name for p in cache.iterdir()] == ["README.md"]
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "keep.py").write_text("")
    run = subprocess.run(["make", "--no-print-directory", "clean-cache"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "MERGELAB_DATA_DIR": str(tmp_path)})
    assert run.returncode != 0 and "refusing to empty it" in run.stdout and (tmp_path / "keep.py").is_file()
    # datasets (or imported experts, or open_clip weights) kept inside the cache are refused, not deleted with it
    (cache / "datasets" / "MNIST").mkdir(parents=True)
    for variable in ("MERGELAB_CLIP_DATA_ROOT", "MERGELAB_CLIP_EXPERTS_DIR", "MERGELAB_CLIP_WEIGHTS_DIR"):
        run = subprocess.run(["make", "--no-print-directory", "clean-cache"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "MERGELAB_DATA_DIR": str(cache), variable: str(cache / "datasets")})
        assert run.returncode != 0 and "lies inside" in run.stdout and (cache / "datasets" / "MNIST").is_dir(), variable
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    subprocess.run(["make", "--no-print-directory", "clean-cache"], cwd=root, capture_output=True, check=True,
                   env={**os.environ, "MERGELAB_DATA_DIR": str(cache), "MERGELAB_CLIP_DATA_ROOT": str(outside)})
    assert [p.name for p in cache.iterdir()] == ["README.md"] and outside.is_dir()


WRITE_CLAIMS = (
    "import json\n"
    "from mergelab.paths import results_dir\n"
    "claims = [{'claim': 'Alpha beats beta | by far.', 'source': 'doe2020alpha', 'status': 'reproduced', 'evidence': {}},\n"
    "          {'claim': 'Gamma helps.', 'source': 'doe2020alpha', 'status': 'not_testable', 'evidence': {}}]\n"
    "(results_dir() / '00_alpha.json').write_text(json.dumps({'value': value, 'claims': claims,\n"
    "    'provenance': {'parameters': {'profile': 'smoke'}}}))"
)


def test_claims_page_is_generated_from_this_runs_results(tmp_path: Path) -> None:
    root = tmp_path
    make_project(root)
    write_notebook(root / "notebooks" / "00_alpha.ipynb", "Alpha chapter", WRITE_CLAIMS)
    yml = root / "book" / "_quarto.yml"
    yml.write_text(QUARTO_YML.replace("    - index.qmd\n", "    - index.qmd\n    - claims.qmd\n"))
    (root / "book" / "claims.qmd").write_text("---\ntitle: stale\n---\nA stale page typed by hand.\n")
    result = build(root)
    page = (root / "out" / "claims.qmd").read_text()
    assert "stale" not in page
    assert "At the `smoke` size: 1 of 2 claims reproduced, 0 not reproduced, 1 not testable." in page
    assert "| Alpha chapter | `smoke` | Alpha beats beta \\| by far. | [@doe2020alpha] | reproduced |" in page
    html = (result.book.parent / "claims.html").read_text()
    assert "<table>" in html and "Gamma helps." in html and "not testable" in html
    assert 'href="#ref-doe2020alpha"' in html and 'id="ref-doe2020alpha"' in html and "[@" not in html
    assert 'href="claims.html"' in result.book.read_text()


def test_claims_page_without_claims_says_so(tmp_path: Path) -> None:
    from mergelab.report.claims import claims_markdown, gather_claims

    assert "No chapter of this run recorded claims." in claims_markdown([])
    (tmp_path / "00_a.json").write_text(json.dumps({"claims": [{"claim": "c", "source": "s", "status": "not_reproduced",
                                                                "evidence": {}}]}))
    claims = gather_claims(tmp_path, ["index.qmd", "00_a.ipynb", "01_missing.ipynb"])
    assert claims == [{"chapter": "00_a", "profile": "?", "claim": "c", "source": "s", "status": "not_reproduced",
                       "evidence": {}}]
    assert "**not reproduced**" in claims_markdown(claims)


def test_force_reruns_an_up_to_date_notebook_and_profiles_share_a_folder(
    executed: tuple[Path, report.ReportResult], tmp_path: Path
) -> None:
    shutil.copytree(executed[0], tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    forced = build(tmp_path, force=True)
    assert forced.statuses == {"00_alpha": report.EXECUTED}  # FORCE=1 executes even when up to date
    # another profile in the same reports folder: its own stamp, results of the profile that ran last
    (tmp_path / "params" / "other").mkdir()
    (tmp_path / "params" / "other" / "00_alpha.yaml").write_text("value: 7\n")
    other = build(tmp_path, profile="other")
    assert other.statuses == {"00_alpha": report.EXECUTED}
    assert json.loads((out / "results" / "00_alpha.json").read_text()) == {"value": 7}
    assert report.stamp_path(out, "00_alpha", "other").is_file()
    # back to the first profile: the folder now holds the other profile's notebook, so it runs again
    back = build(tmp_path)
    assert back.statuses == {"00_alpha": report.EXECUTED}
    assert json.loads((out / "results" / "00_alpha.json").read_text()) == {"value": 2}


def test_the_claims_page_refuses_claims_that_do_not_follow_from_their_chapters_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A chapter of ``RECOMPUTED`` has its claims computed again from its results JSON when the book
    gathers them: consistent results pass; a status edited by hand (or written by an older rule) stops
    the book with a message naming the chapter, the claim and the command that re-runs it; results that
    lack an input of the rule (written before the chapter stored it) are not refused but said unchecked."""
    import sys
    import types

    from mergelab.report import claims as claims_module

    rule = types.ModuleType("fake_chapter_rule")
    rule.claims_from_results = lambda r: [{"claim": "A beats B", "source": "x", "evidence": {"gap": r["gap"]},
                                          "status": "reproduced" if r["gap"] > 0 else "not_reproduced"}]
    monkeypatch.setitem(sys.modules, "fake_chapter_rule", rule)
    monkeypatch.setitem(claims_module.RECOMPUTED, "00_a", "fake_chapter_rule")
    results = {"gap": 0.2, "claims": rule.claims_from_results({"gap": 0.2})}
    (tmp_path / "00_a.json").write_text(json.dumps(results))
    assert [c["status"] for c in claims_module.gather_claims(tmp_path, ["00_a.ipynb"])] == ["reproduced"]
    results["gap"] = -0.1  # the numbers say otherwise: the stored word is refused
    (tmp_path / "00_a.json").write_text(json.dumps(results))
    with pytest.raises(report.ReportError, match=r"00_a: the claims in its results do not follow from its numbers. "
                                                  r"The claim .*reproduced.* is stored; the chapter's rule gives "
                                                  r".*not_reproduced.*make report NOTEBOOKS=00_a FORCE=1"):
        claims_module.gather_claims(tmp_path, ["00_a.ipynb"])
    # results written before the chapter stored every input of its rule: not refused, but said
    del results["gap"]
    results["claims"][0]["status"] = "not_reproduced"
    (tmp_path / "00_a.json").write_text(json.dumps(results))
    assert [c["status"] for c in claims_module.gather_claims(tmp_path, ["00_a.ipynb"])] == ["not_reproduced"]
    assert re.search(r"warning: 00_a: its claims were not checked against its numbers \(KeyError: 'gap'\).*"
                     r"make report NOTEBOOKS=00_a FORCE=1", capsys.readouterr().err)


@pytest.mark.parametrize("force", ["1", ""])
def test_make_report_force_reaches_the_runner_as_force(force: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make report FORCE=1`` (the README's way to re-run everything) is the command line's ``--force``,
    and that is ``build_report(force=True)``, the path the test above runs; without it, ``False``."""
    import shlex
    import subprocess

    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "--no-print-directory", "report", f"FORCE={force}", "PROFILE=smoke",
                          "REPORTS=/nonexistent/reports"], cwd=root, capture_output=True, text=True, check=True)
    line = [x for x in dry.stdout.replace("\\\n", " ").splitlines() if "-m mergelab.report" in x][-1]
    words = shlex.split(line)
    argv = words[words.index("mergelab.report") + 1:]
    seen: dict = {}
    monkeypatch.setattr(report, "build_report", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    assert report.main(argv) == 0
    assert seen["args"][:4] == ("smoke", Path("/nonexistent/reports"), None, bool(force))


def test_a_missing_kernel_is_a_clear_error_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="kernel 'no-such-mergelab-kernel' is not installed: run `make env`"):
        report.check_kernel("no-such-mergelab-kernel")


@pytest.mark.timeout(600)  # two runs one after the other, each starting a kernel
def test_two_concurrent_runs_on_one_folder_execute_each_chapter_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    make_project(tmp_path)
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from mergelab import report\n"
        "root = Path(sys.argv[1])\n"
        "r = report.build_report(profile='smoke', reports=root / 'out', notebooks_dir=root / 'notebooks',\n"
        "    params_dir=root / 'params', quarto_yml=root / 'book' / '_quarto.yml', source_dir=root / 'src',\n"
        "    renderer='pandoc')\n"
        "print('STATUSES', json.dumps(r.statuses))\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in runs]
    assert all(p.returncode == 0 for p in runs), outputs
    statuses = sorted(json.loads(o.split("STATUSES ", 1)[1])["00_alpha"] for o in outputs)
    assert statuses == sorted([report.EXECUTED, report.UP_TO_DATE])
    waited = next(o for o in outputs if report.UP_TO_DATE in o.split("STATUSES ", 1)[1])
    assert "is being built by another `make report` run" in waited and "waiting for it to finish" in waited
    assert not (tmp_path / "out" / (report.LOCK_FILE + ".holder")).exists()


@pytest.mark.timeout(600)
def test_ctrl_c_ends_with_one_line_and_leaves_no_kernel_files(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    make_project(tmp_path)
    started = tmp_path / "cell-started"  # Ctrl-C while a chapter computes (nbclient handles it during kernel start-up)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "Alpha chapter",
                   f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(120)")
    import tempfile

    # a short runtime folder, as users have (~/.local/share/jupyter/runtime): the kernel's sockets fit there
    runtime = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import mergelab.report as r\n"
        "root = Path(sys.argv[1])\n"
        "orig = r.build_report  # the command's own handling, on the throwaway project\n"
        "r.build_report = lambda profile, reports, names, force, renderer, **options: orig(profile, root / 'out', names,\n"
        "    force, root / 'notebooks', root / 'params', root / 'book' / '_quarto.yml', root / 'src', renderer, **options)\n"
        "sys.exit(r.main(['--profile', 'smoke', '--renderer', 'pandoc']))\n"
    )
    # as from a terminal: Ctrl-C not ignored (a library in this test process may have set SIGINT to SIG_IGN,
    # which a child inherits; measured in a full `make test`, where the runner then ran to its end)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)  # until the chapter's long cell runs
    assert started.exists() and list(runtime.glob("kernel-*.json")), "the cell never started:\n" + (
        proc.communicate()[1] if proc.poll() is not None else "still waiting after 240 s")
    time.sleep(1)
    masks = {who: [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
             for who, pid in (("runner", proc.pid), ("test process", os.getpid()))}
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"{masks}\n{err}"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: chapters already executed are kept")
    left = sorted(p.name for p in runtime.iterdir())
    runtime.rmdir() if not left else None
    assert not left, f"left behind: {left}"
    assert not list((tmp_path / "out").glob(".*.running.ipynb")) and not list((tmp_path / "out").glob(".*.log"))


FAKE_QUARTO = """\
#!{python}
# A stand-in for Quarto (it cannot be installed on these machines): records how it was called and checks
# the project it was handed the way `quarto render` would need it, then writes the book's index page.
import json, pathlib, sys, yaml
args = sys.argv[1:]
project = pathlib.Path(args[1])
config = yaml.safe_load((project / "_quarto.yml").read_text())
chapters = config["book"]["chapters"]
missing = [c for c in chapters + [config["bibliography"]] if not (project / c).is_file()]
pathlib.Path({record!r}).write_text(json.dumps({{"args": args, "chapters": chapters, "missing": missing}}))
if missing:
    sys.exit(2)
book = project / config["project"]["output-dir"]
book.mkdir(exist_ok=True)
(book / "index.html").write_text("<html>rendered by the stand-in</html>")
sys.exit({exit_code})
"""


def fake_quarto(bin_dir: Path, record: Path, exit_code: int = 0) -> None:
    """Put an executable ``quarto`` stand-in into ``bin_dir`` (see ``FAKE_QUARTO``)."""
    import sys

    bin_dir.mkdir()
    script = bin_dir / "quarto"
    script.write_text(FAKE_QUARTO.format(python=sys.executable, record=str(record), exit_code=exit_code))
    script.chmod(0o755)


def test_with_quarto_on_path_the_book_is_handed_to_quarto_render(
    executed: tuple[Path, report.ReportResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Quarto path, with a stand-in executable: ``auto`` prefers Quarto, calls ``quarto render
    <reports>`` once on a project whose chapters and bibliography are all in place, and returns the index
    Quarto wrote; a failing Quarto is an error that names the command and its exit code."""
    shutil.copytree(executed[0], tmp_path / "project")
    root, out = tmp_path / "project", tmp_path / "project" / "out"
    shutil.rmtree(out / report.runner.BOOK_DIR, ignore_errors=True)
    record = tmp_path / "quarto-call.json"
    fake_quarto(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert report.quarto_executable() == str(tmp_path / "bin" / "quarto")

    index, used = report.render_book(out, root / "book" / "_quarto.yml", "auto")
    assert used == "quarto" and index == out.resolve() / report.runner.BOOK_DIR / "index.html"
    assert index.read_text() == "<html>rendered by the stand-in</html>"  # Quarto's page, not pandoc's
    call = json.loads(record.read_text())
    assert call == {"args": ["render", str(out.resolve())], "chapters": ["index.qmd", "00_alpha.ipynb"], "missing": []}

    record.unlink()
    shutil.rmtree(tmp_path / "bin")
    fake_quarto(tmp_path / "bin", record, exit_code=3)
    with pytest.raises(report.ReportError, match=r"`quarto render .*` failed \(exit code 3\)"):
        report.render_book(out, root / "book" / "_quarto.yml", "quarto")
    assert record.is_file()


def test_asking_for_quarto_without_it_says_how_to_get_it(
    executed: tuple[Path, report.ReportResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(executed[0], tmp_path / "project")
    monkeypatch.setattr(report.book, "quarto_executable", lambda: None)
    with pytest.raises(report.ReportError, match=r"quarto is not on PATH; `make quarto`.*conda-forge"):
        report.render_book(tmp_path / "project" / "out", tmp_path / "project" / "book" / "_quarto.yml", "quarto")


LANE_BODY = (
    "import json, os, time\n"
    "from mergelab.paths import results_dir\n"
    "start = time.time()\n"
    "(results_dir() / '{name}.started').write_text(str(start))\n"
    "deadline = start + 120  # side by side: each chapter in `meet` starts while this one waits for it\n"
    "while not all((results_dir() / f'{{o}}.started').is_file() for o in meet) and time.time() < deadline:\n"
    "    time.sleep(0.05)\n"
    "met = all((results_dir() / f'{{o}}.started').is_file() for o in meet)\n"
    "time.sleep(value)\n"
    "(results_dir() / '{name}.json').write_text(json.dumps({{'start': start, 'end': time.time(), 'met': met, "
    "'threads': os.environ.get('OMP_NUM_THREADS'), 'nice': os.nice(0), 'autogroup': "
    "open('/proc/self/autogroup').read().split()[-1] if os.path.exists('/proc/self/autogroup') else None}}))"
)
"""A lane chapter: it says it started, waits (up to 120 s) until every chapter named in its parameter
``meet`` has started too, sleeps ``value`` s and writes its times. Chapters that meet each other overlap by
construction, however slowly a loaded machine starts their kernels; one that never comes is ``met: false``."""


def write_lane_notebook(path: Path, name: str) -> None:
    """A :data:`LANE_BODY` chapter, with ``meet = []`` beside ``value`` in its parameters cell."""
    write_notebook(path, name, LANE_BODY.format(name=name))
    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source += "\nmeet = []  # chapters to wait for, side by side"
    nbformat.write(nb, path)


def make_three_chapters(root: Path, failing: str | None = None) -> None:
    """The throwaway project with lane chapters 01_beta and 02_gamma after 00_alpha, each sleeping ``value`` s
    (1) after meeting the chapters of its ``meet`` (none)."""
    make_project(root)
    for name in ("01_beta", "02_gamma"):
        if name == failing:
            write_notebook(root / "notebooks" / f"{name}.ipynb", name, "raise ValueError('boom in ' + str(value))")
        else:
            write_lane_notebook(root / "notebooks" / f"{name}.ipynb", name)
        (root / "params" / PROFILE / f"{name}.yaml").write_text("value: 1\n")
    (root / "book" / "_quarto.yml").write_text(QUARTO_YML.replace(
        "    - 00_alpha.ipynb\n", "    - 00_alpha.ipynb\n    - 01_beta.ipynb\n    - 02_gamma.ipynb\n"))


@pytest.mark.timeout(240)
def test_chapters_after_the_first_run_side_by_side_in_lanes(tmp_path: Path) -> None:
    from mergelab.report.lanes import lane_threads

    make_three_chapters(tmp_path)
    for name, other in (("01_beta", "02_gamma"), ("02_gamma", "01_beta")):  # each waits until the other started
        (tmp_path / "params" / PROFILE / f"{name}.yaml").write_text(f"value: 1\nmeet: [{other}]\n")
    result = build(tmp_path, jobs=2)
    assert result.statuses == {"00_alpha": report.EXECUTED, "01_beta": report.EXECUTED, "02_gamma": report.EXECUTED}
    out = tmp_path / "out"
    beta, gamma = (json.loads((out / "results" / f"{n}.json").read_text()) for n in ("01_beta", "02_gamma"))
    assert beta["met"] and gamma["met"]  # each started while the other waited for it: side by side
    assert beta["start"] < gamma["end"] and gamma["start"] < beta["end"]
    assert beta["threads"] == gamma["threads"] == str(lane_threads(2))
    for name in ("01_beta", "02_gamma"):
        assert report.stamp_path(out, name, PROFILE).is_file() and (out / f"{name}.ipynb").is_file()
        assert json.loads((out / "timings" / f"{name}.{PROFILE}.json").read_text())["wall_s"] >= 1  # value: 1 s asleep
    assert not list(out.glob(".*.lane.*")) and result.book is not None
    assert build(tmp_path, jobs=2).statuses["02_gamma"] == report.UP_TO_DATE
    (tmp_path / "params" / PROFILE / "02_gamma.yaml").write_text("value: 1\n")  # out of date alone, runs here
    assert build(tmp_path, jobs=2).statuses == {"00_alpha": report.UP_TO_DATE, "01_beta": report.UP_TO_DATE,
                                                 "02_gamma": report.EXECUTED}
    alone = json.loads((out / "results" / "02_gamma.json").read_text())
    assert alone["threads"] == gamma["threads"]  # the thread count of the full build: the same sums, the same bits
    named = build(tmp_path, jobs=2, names=["02_gamma"], force=True)  # `make report NOTEBOOKS=02_gamma FORCE=1`
    assert named.statuses == {"02_gamma": report.EXECUTED}
    assert json.loads((out / "results" / "02_gamma.json").read_text())["threads"] == gamma["threads"]


@pytest.mark.timeout(240)
def test_a_failing_lane_names_its_notebook_and_keeps_the_others_results(tmp_path: Path) -> None:
    make_three_chapters(tmp_path, failing="01_beta")
    with pytest.raises(report.ReportError, match=r"01_beta\.ipynb failed in its lane(.|\n)*boom in 1"):
        build(tmp_path, jobs=2)
    out = tmp_path / "out"
    assert (out / "results" / "02_gamma.json").is_file() and report.stamp_path(out, "02_gamma", PROFILE).is_file()
    assert (out / "01_beta.failed.ipynb").is_file() and (out / ".01_beta.lane.log").is_file()
    assert not report.stamp_path(out, "01_beta", PROFILE).exists()


@pytest.mark.timeout(240)
def test_every_failing_lane_is_named(tmp_path: Path) -> None:
    make_three_chapters(tmp_path, failing="01_beta")
    write_notebook(tmp_path / "notebooks" / "02_gamma.ipynb", "02_gamma", "raise ValueError('gamma too')")
    with pytest.raises(report.ReportError, match=r"2 chapters failed in their lanes \(01_beta.ipynb, 02_gamma.ipynb\)"
                                                 r"|2 chapters failed in their lanes \(02_gamma.ipynb, 01_beta.ipynb\)"):
        build(tmp_path, jobs=2)
    out = tmp_path / "out"
    assert (out / ".01_beta.lane.log").is_file() and (out / ".02_gamma.lane.log").is_file()


def mark_independent(notebook: Path) -> None:
    """Say in ``notebook``'s metadata that it needs nothing the first chapter builds."""
    nb = nbformat.read(notebook, as_version=4)
    nb.metadata["mergelab"] = {"waits_for_first_chapter": False}
    nbformat.write(nb, notebook)


@pytest.mark.timeout(240)
def test_a_chapter_that_needs_nothing_from_the_first_starts_beside_it(tmp_path: Path) -> None:
    """Chapter 00 runs here while 02_gamma (marked independent) runs in the other lane; 01_beta (which
    waits, the default) starts only once chapter 00 is done."""
    from mergelab.report.lanes import BESIDE_FIRST_NICE, lane_threads

    make_three_chapters(tmp_path)
    write_lane_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "00_alpha")
    # chapter 00 and 02_gamma each wait until the other started: side by side, however slowly the niced lane starts
    (tmp_path / "params" / PROFILE / "00_alpha.yaml").write_text("value: 1\nmeet: [02_gamma]\n")
    (tmp_path / "params" / PROFILE / "02_gamma.yaml").write_text("value: 1\nmeet: [00_alpha]\n")
    mark_independent(tmp_path / "notebooks" / "02_gamma.ipynb")
    build(tmp_path, jobs=2)
    alpha, beta, gamma = (json.loads((tmp_path / "out" / "results" / f"{n}.json").read_text())
                          for n in ("00_alpha", "01_beta", "02_gamma"))
    assert alpha["met"] and gamma["met"]  # beside chapter 00
    assert gamma["start"] < alpha["end"] and alpha["start"] < gamma["end"]
    assert beta["start"] >= alpha["end"]  # after it
    assert alpha["threads"] == beta["threads"] == gamma["threads"] == str(lane_threads(2))  # no oversubscription
    here = os.nice(0)
    assert alpha["nice"] == beta["nice"] == here  # the critical path at this process's priority
    assert gamma["nice"] == min(19, here + BESIDE_FIRST_NICE)  # beside it: the CPU time it leaves
    if gamma["autogroup"] is not None:  # Linux schedules the kernel's session as a group: niced too
        assert int(gamma["autogroup"]) == gamma["nice"] and int(alpha["autogroup"]) == here


def test_a_kernel_keeps_the_niceness_of_the_process_that_launched_it() -> None:
    """A new session (as a Jupyter kernel starts) gets an autogroup at nice 0 where Linux has them;
    :func:`keep_niceness` gives it the launcher's niceness, and does nothing for a process at nice 0."""
    import subprocess
    import sys

    from mergelab.report.runner import keep_niceness

    code = ("import os, subprocess, sys\n"
            "from mergelab.report.runner import keep_niceness\n"
            "os.nice(3)\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)'], start_new_session=True)\n"
            "group = f'/proc/{p.pid}/autogroup'\n"
            "print(keep_niceness(p.pid), open(group).read().split()[-1] if os.path.exists(group) else None)\n"
            "p.kill()\n")
    done, value = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if Path("/proc/self/autogroup").exists():
        assert (done, value) == ("True", str(min(19, os.nice(0) + 3)))
    else:
        assert (done, value) == ("False", "None")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"], start_new_session=True)
    try:
        assert keep_niceness(sleeper.pid) is (os.nice(0) > 0 and Path("/proc/self/autogroup").exists())
    finally:
        sleeper.kill()


@pytest.mark.timeout(240)
def test_when_the_first_chapter_fails_the_chapters_waiting_for_it_do_not_run(tmp_path: Path) -> None:
    make_three_chapters(tmp_path)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "Alpha", "raise ValueError('alpha broke')")
    mark_independent(tmp_path / "notebooks" / "02_gamma.ipynb")
    with pytest.raises(report.ReportError, match=r"00_alpha\.ipynb failed(.|\n)*alpha broke"):
        build(tmp_path, jobs=2)
    out = tmp_path / "out"
    assert (out / "results" / "02_gamma.json").is_file()  # independent: it ran to the end
    assert not (out / "results" / "01_beta.json").exists() and not report.stamp_path(out, "01_beta", PROFILE).exists()


def test_lanes_read_which_chapters_wait_and_start_the_longest_first(tmp_path: Path) -> None:
    from mergelab.report.lanes import expected_seconds, waits_for_first

    write_notebook(tmp_path / "a.ipynb", "A", "pass")
    assert waits_for_first(tmp_path / "a.ipynb") is True
    mark_independent(tmp_path / "a.ipynb")
    assert waits_for_first(tmp_path / "a.ipynb") is False
    nb = nbformat.read(tmp_path / "a.ipynb", as_version=4)
    nb.metadata["mergelab"] = {"waits_for_first_chapter": "no"}
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(report.ReportError, match=r"waits_for_first_chapter='no' is not valid; use true or false"):
        waits_for_first(tmp_path / "a.ipynb")
    (tmp_path / "timings").mkdir()
    (tmp_path / "timings" / f"b.{PROFILE}.json").write_text(json.dumps({"notebook": "b", "wall_s": 5.0}))
    assert expected_seconds(tmp_path, PROFILE) == {"b": 5.0}  # this folder's last records
    (tmp_path / f"timings-{PROFILE}.json").write_text(json.dumps({"chapters": [{"notebook": "c", "wall_s": 9.0}]}))
    assert expected_seconds(tmp_path, PROFILE) == {"c": 9.0}  # the committed cold run wins
    both = [{"notebook": "c", "wall_s": 9.0, "cpu_s": 2.0}, {"notebook": "d", "wall_s": 3.0, "cpu_s": 6.0}]
    (tmp_path / f"timings-{PROFILE}.json").write_text(json.dumps({"chapters": both}))
    assert expected_seconds(tmp_path, PROFILE) == {"c": 2.0, "d": 6.0}  # the work, not the waiting beside chapter 00
    both[1]["cpu_s"] = None  # a record from before CPU times: wall times for all, comparable with each other
    (tmp_path / f"timings-{PROFILE}.json").write_text(json.dumps({"chapters": both}))
    assert expected_seconds(tmp_path, PROFILE) == {"c": 9.0, "d": 3.0}


def test_lanes_start_the_unmeasured_chapters_then_the_longest_first(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One lane, so the order the chapters are taken in is the order they run: chapters with no measured time
    first (in plan order), then by the committed record's CPU time, longest first."""
    from mergelab.report import lanes

    plan = []
    for name in ("short", "new_a", "long", "middle", "new_b"):
        write_notebook(tmp_path / f"{name}.ipynb", name, "pass")
        plan.append((tmp_path / f"{name}.ipynb", {}, "digest"))
    chapters = [{"notebook": "short", "cpu_s": 5.0}, {"notebook": "long", "cpu_s": 50.0},
                {"notebook": "middle", "cpu_s": 20.0}]
    (tmp_path / f"timings-{PROFILE}.json").write_text(json.dumps({"chapters": chapters}))
    ran = []

    def fake_lane(notebook, parameters, profile, reports, digest, threads, nice=0, environ=None):
        ran.append(Path(notebook).stem)
        return {"wall_s": 0.0, "cache": "warm"}

    monkeypatch.setattr(lanes, "_run_lane", fake_lane)
    timings = lanes.run_in_lanes(plan, PROFILE, tmp_path, jobs=1, threads=1)
    assert ran == ["new_a", "new_b", "long", "middle", "short"] and set(timings) == set(ran)


def test_bad_jobs_are_named() -> None:
    from mergelab.report.lanes import resolve_jobs

    assert resolve_jobs(1, 7) == 1 and resolve_jobs(8, 3) == 3 and resolve_jobs(3, 1) == 1
    assert 1 <= resolve_jobs("auto", 7) <= 4
    from mergelab.report import lanes

    for cores, auto, per_lane in ((3, 3, 1), (8, 4, 4), (1, 1, 1)):  # one lane per core, at most 4; cores shared out
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lanes, "usable_cores", lambda cores=cores: cores)
            assert resolve_jobs("auto", 7) == auto and resolve_jobs("auto", 2) == min(auto, 2)
            assert lanes.lane_threads(2) == per_lane and lanes.lane_threads(1) == cores
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(report.ReportError, match="jobs="):
            resolve_jobs(bad, 7)
    for bad in ("two", "0"):
        with pytest.raises(SystemExit):
            report.parse_args(["--jobs", bad])
    assert report.parse_args(["--jobs", "3"]).jobs == 3 and report.parse_args([]).jobs == "auto"


def test_a_relative_data_folder_names_the_same_folder_for_the_report_and_its_chapters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``MERGELAB_DATA_DIR=cache make report``: chapters' kernels run in the notebooks' folder, so a relative
    path must be made absolute before they start, or each chapter would cache under ``notebooks/cache``."""
    make_project(tmp_path)
    write_notebook(tmp_path / "notebooks" / "00_alpha.ipynb", "00_alpha",
                   "import json\nfrom mergelab.paths import data_dir, results_dir\n"
                   "(results_dir() / '00_alpha.json').write_text(json.dumps({'data': str(data_dir())}))")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGELAB_DATA_DIR", "cache")
    build(tmp_path)
    written = json.loads((tmp_path / "out" / "results" / "00_alpha.json").read_text())
    assert written["data"] == str((tmp_path / "cache").resolve())
    assert not (tmp_path / "notebooks" / "cache").exists()


def test_make_hands_every_folder_variable_to_its_processes_as_an_absolute_path(tmp_path: Path) -> None:
    """``make lab`` and ``make report`` started from the checkout with ``MERGELAB_DATA_DIR=cache``: JupyterLab's
    kernels run in notebooks/, so make exports each of :data:`mergelab.paths.DIR_VARIABLES` made absolute."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **{var: f"rel-{i}" for i, var in enumerate(paths.DIR_VARIABLES)}}
    show = "show: ; @" + " ".join(f'echo "$${var}";' for var in paths.DIR_VARIABLES)
    run = subprocess.run(["make", "--no-print-directory", "-f", str(root / "Makefile"), "--eval", show, "show"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(tmp_path / f"rel-{i}") for i in range(len(paths.DIR_VARIABLES))]
    # the same given on make's command line (`make lab MERGELAB_DATA_DIR=cache`), which overrides the Makefile
    settings = [f"{var}=cli-{i}" for i, var in enumerate(paths.DIR_VARIABLES)]
    run = subprocess.run(["make", "--no-print-directory", "-f", str(root / "Makefile"), "--eval", show, "show", *settings],
                         cwd=tmp_path, env=os.environ, capture_output=True, text=True, check=True)
    assert run.stdout.split() == [str(tmp_path / f"cli-{i}") for i in range(len(paths.DIR_VARIABLES))]
