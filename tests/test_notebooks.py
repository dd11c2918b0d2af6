"""Every notebook runs with ``params/smoke`` and writes sane results; notebooks are committed clean."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import NOTEBOOKS
from mergelab import report

ROOT = Path(__file__).resolve().parents[1]


def _accuracies(node, path=""):
    """Yield (path, value) for every key that names an accuracy, anywhere in the results."""
    if isinstance(node, dict):
        for k, v in node.items():
            if (v is None or isinstance(v, (int, float))) and not isinstance(v, bool) and "accuracy" in k:
                yield f"{path}/{k}", v  # None (a JSON null) is yielded too, so that it fails below
            elif k.endswith("per_task_accuracy") and isinstance(v, dict):
                for t, a in v.items():
                    yield f"{path}/{k}/{t}", a
            else:
                yield from _accuracies(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _accuracies(v, f"{path}[{i}]")


STRAY_REPR = re.compile(r"<[\w.]+( object)? at 0x|<matplotlib\.|<Figure size|<Axes[ :]|\bText\(|\b(Posix|Windows)?Path\(")
"""Reprs that a cell's last expression leaks into the book when it has nothing richer to show (a path
a helper returned, matplotlib's artists and figures, an object's default repr): a chapter's cells end
so that nothing prints, or with a table or figure meant to be read."""


def test_there_are_notebooks_and_each_is_a_chapter():
    assert "00_benchmark_and_baselines" in NOTEBOOKS
    chapters = report.book_chapters(ROOT / "reports" / "_quarto.yml")
    assert [c for c in chapters if c.endswith(".ipynb")] == [f"{n}.ipynb" for n in NOTEBOOKS]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_parameters_and_profiles(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "mergelab"
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    for profile in ("smoke", "tiny"):
        assert (ROOT / "params" / profile / f"{name}.yaml").is_file()


@pytest.mark.notebook
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_smoke_size_and_writes_results(name, run_notebook):
    results = run_notebook(name)
    prov = results["provenance"]
    assert prov["notebook"] == name and prov["parameters"]["profile"] == "smoke"
    assert {"versions", "device", "git_commit", "wall_time_s"} <= set(prov)
    assert isinstance(prov["torch_threads"], int) and prov["torch_threads"] >= 1
    if name != "06_cycle_consistent_merging":  # every chapter on the tiny benchmark says which pretrained weights it used
        from mergelab import paths
        from mergelab.cache import file_sha256

        sha = prov["pretrained_sha256"]
        found = [f for f in paths.data_dir().rglob("pretrained.safetensors") if file_sha256(f) == sha]
        assert found, f"pretrained_sha256 {sha} is not the hash of any cached encoder under {paths.data_dir()}"
    from mergelab.report.claims import RECOMPUTED, check_claims

    assert name in RECOMPUTED  # every chapter's claims are judged again from its numbers, and here they were
    assert check_claims(name, {k: v for k, v in results.items() if k != "_executed_notebook"}) is None
    executed = json.loads(Path(results["_executed_notebook"]).read_text())
    stray = [o["data"]["text/plain"] for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
             if o.get("output_type") == "execute_result" and not {"text/html", "image/png"} & set(o["data"])
             and STRAY_REPR.search("".join(o["data"].get("text/plain", "")))]  # a table or image is shown, not its repr
    assert not stray, f"a cell ends with a value whose repr the reader sees: {stray[:2]}"
    if not name.startswith(("01_", "02_")):  # 01 and 02 close with their own summaries of the run's numbers
        shown = [t for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                 for t in ["".join(o.get("data", {}).get("text/markdown", ""))] if "Main result of this run" in t]
        k = sum(c["status"] == "reproduced" for c in results["claims"])  # the count shown is the run's own
        assert len(shown) == 1 and f"; {k} of {len(results['claims'])} claims reproduced" in shown[0], shown
    # every claim names its source by its key in the book's bibliography (the claims page cites it)
    import re

    keys = set(re.findall(r"@\w+\{([^,\s]+),", (ROOT / "reports" / "references.bib").read_text()))
    for c in results.get("claims", []):
        assert c["source"] in keys, f"claim source {c['source']!r} is not a key of reports/references.bib"
        assert c["status"] in ("reproduced", "not_reproduced", "not_testable"), c
    accs = list(_accuracies(results))
    assert accs, "the results hold no accuracy at all"
    for where, value in accs:
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{where} = {value!r} is not a number"
        if "normalized" in where:
            assert value >= 0.0, where
        else:
            assert 0.0 <= value <= 1.0, where


def _parameters_cell(name: str) -> dict:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    defaults: dict = {}
    exec("".join(cell["source"]), {}, defaults)  # literals only
    return defaults


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_holds_the_tiny_profile_and_every_profile_names_only_its_keys(name):
    """Opening a chapter in JupyterLab runs ``tiny``: the parameters cell equals ``params/tiny`` (the
    benchmark block of ``_benchmark.yaml`` merged with the chapter's file); every other profile sets
    only parameters the notebook has."""
    defaults = _parameters_cell(name)
    assert defaults == report.profile_params("tiny", name)
    for profile in sorted(p.name for p in (ROOT / "params").iterdir() if (p / f"{name}.yaml").is_file()):
        unknown = set(report.profile_params(profile, name)) - set(defaults)
        assert not unknown, f"params/{profile} sets {sorted(unknown)}, which {name} does not have"


@pytest.mark.parametrize("profile", ["smoke", "tiny"])
def test_chapters_that_read_the_experts_use_chapter_00s_recipe(profile):
    """Chapters 02-05 merge, compress or route chapter 0's experts: their ``finetune`` is chapter 0's, so they
    read its cache and their text ("chapter 0's experts") stays true (chapter 01 trains its own SGD grid;
    06 trains from scratch). The clip profiles are checked in test_clip.py."""
    first = report.profile_params(profile, NOTEBOOKS[0])["finetune"]
    readers = [n for n in NOTEBOOKS[1:] if "finetune" in report.profile_params(profile, n)
               and not n.startswith("01_")]
    assert len(readers) >= 4
    for name in readers:
        assert report.profile_params(profile, name)["finetune"] == first, f"params/{profile}/{name}.yaml"


def test_a_chapter_file_repeating_the_benchmark_block_is_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "_benchmark.yaml").write_text("seed: 0\nbenchmark: tiny\n")
    (tmp_path / "p" / "00_x.yaml").write_text("seed: 1\ntasks: [digits]\n")
    with pytest.raises(report.ReportError, match=r"sets seed, which .*_benchmark.yaml sets for every chapter"):
        report.load_params(tmp_path / "p" / "00_x.yaml", "p", "00_x")
    (tmp_path / "p" / "00_x.yaml").write_text("tasks: [digits]\n")
    assert report.load_params(tmp_path / "p" / "00_x.yaml", "p", "00_x") == {"seed": 0, "benchmark": "tiny",
                                                                               "tasks": ["digits"]}


def _git_repo(path: Path, with_filter: bool = True):
    """A new git repository at ``path`` with a committer set and, when ``with_filter``, the notebooks' filter that
    `make git-filter` (run by `make env`) configures; returns ``git(*args) -> stdout`` run there."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@example.org")
    git("config", "user.name", "t")
    if with_filter:
        _install_filter(path)
    return git


def _install_filter(path: Path) -> None:
    """`make git-filter` in the repository at ``path``, with this checkout's Makefile and virtual environment."""
    import subprocess

    subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-C", str(path), "git-filter", f"VENV={ROOT / '.venv'}"],
                   check=True, capture_output=True)


@pytest.mark.timeout(120)
def test_a_notebook_saved_by_jupyterlab_leaves_the_checkout_clean(tmp_path):
    """`make env` installs nbstripout as a git filter: outputs, execution counts and the kernel metadata
    JupyterLab adds are stripped on the way into git, so a chapter run and saved in place is unchanged."""
    import shutil
    import subprocess

    import nbformat

    git = _git_repo(tmp_path)
    name = "00_benchmark_and_baselines.ipynb"
    shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    git("add", name)
    git("commit", "-qm", "chapter")
    assert git("status", "--porcelain") == ""
    nb = nbformat.read(tmp_path / name, as_version=4)  # what a run in JupyterLab leaves, saved in place
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2", "codemirror_mode": {"name": "ipython"}}
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-12-03T10:00:00Z"}
    nbformat.write(nb, tmp_path / name)
    # nothing of it reaches git: no difference, and staging it stages nothing (git status may list the file
    # until then, because git takes a changed file size as a change without running the filter)
    assert subprocess.run(["git", "diff", "--quiet"], cwd=tmp_path).returncode == 0
    git("add", "-A")
    assert git("status", "--porcelain") == "", "the saved notebook changed what git holds"
    nb.cells[0].source += "\nA real edit."
    nbformat.write(nb, tmp_path / name)
    git("add", "-A")
    assert git("status", "--porcelain").strip() == f"M  {name}".strip()  # real edits still reach git


@pytest.mark.timeout(120)
def test_jupyterlab_saves_a_run_chapter_exactly_as_committed(tmp_path, monkeypatch):
    """`make lab` gives JupyterLab's contents manager mergelab.lab.strip_on_save as pre-save hook: a
    chapter run and saved there is written as committed, so `git status` shows it unchanged."""
    import shutil

    import nbformat
    from jupyter_server.services.contents.filemanager import FileContentsManager

    from mergelab import lab, paths

    git = _git_repo(tmp_path)
    (tmp_path / "notebooks").mkdir()
    name = "notebooks/00_benchmark_and_baselines.ipynb"
    shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")  # ignores .ipynb_checkpoints/
    git("add", "-A")
    git("commit", "-qm", "chapter")
    (tmp_path / name).unlink()
    git("checkout", "--", ".")  # the working copy as a fresh clone has it
    assert git("status", "--porcelain") == ""
    monkeypatch.setattr(paths, "notebooks_dir", lambda: tmp_path / "notebooks")
    cm = FileContentsManager(root_dir=str(tmp_path), pre_save_hook=lab.strip_on_save)
    model = cm.get(name)
    nb = model["content"]  # run in JupyterLab: outputs, counts, kernel metadata
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2", "codemirror_mode": {"name": "ipython"}}
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"output {i}\n")]
    cm.save({"type": "notebook", "format": "json", "content": nb}, name)
    assert git("status", "--porcelain") == "", "git status shows the chapter changed"
    # elsewhere (a student's copy) notebooks are saved as they are, outputs included
    cm.save({"type": "notebook", "format": "json", "content": nb}, "copy.ipynb")
    assert nbformat.read(tmp_path / "copy.ipynb", as_version=4).cells[1].outputs


def test_installing_the_filter_records_the_notebooks_stat_data_so_status_needs_no_filter_run(tmp_path):
    """`make git-filter` (run by `make env`) refreshes the index: a notebook whose index entry is stale (a fresh
    clone's notebooks checked out in the second the index was written, or a touched file) is not passed through
    nbstripout again by every `git status` (each chapter runs one for its provenance)."""
    import os
    import shutil

    git = _git_repo(tmp_path, with_filter=False)
    name = "00_benchmark_and_baselines.ipynb"
    shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    git("add", name)
    git("commit", "-qm", "chapter")

    def indexed_mtime() -> int:  # the file's modification time (seconds) as the index records it
        line = next(x for x in git("ls-files", "--debug", name).splitlines() if x.strip().startswith("mtime:"))
        return int(line.split(":")[1].strip().split(":")[0])

    os.utime(tmp_path / name, (1_000_000_000, 1_000_000_000))  # same contents, other stat data: the entry is stale
    assert indexed_mtime() != 1_000_000_000  # what every `git status` would re-read, through the filter
    _install_filter(tmp_path)
    assert indexed_mtime() == 1_000_000_000


def test_the_git_filter_runs_nbstripout_through_mergelab_nbfilter_with_the_same_output(tmp_path):
    """`make git-filter` points git's clean filter at `python -m mergelab.nbfilter`, which gives nbstripout's output
    to the byte (outputs, counts and the extra keys stripped) without loading rfc3987-syntax's grammar."""
    import re
    import subprocess
    import sys

    import nbformat

    _git_repo(tmp_path)
    clean = subprocess.run(["git", "config", "filter.nbstripout.clean"], cwd=tmp_path, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert clean.endswith(" -m mergelab.nbfilter"), clean
    nb = nbformat.read(ROOT / "notebooks" / "00_benchmark_and_baselines.ipynb", as_version=4)
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.2"}
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.execution_count = 3
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="output\n")]
    raw = nbformat.writes(nb)
    ours = subprocess.run([sys.executable, "-X", "importtime", "-m", "mergelab.nbfilter"], cwd=tmp_path, input=raw,
                          capture_output=True, text=True, check=True)
    theirs = subprocess.run([sys.executable, "-m", "nbstripout"], cwd=tmp_path, input=raw, capture_output=True,
                            text=True, check=True)
    assert ours.stdout == theirs.stdout and '"outputs": []' in ours.stdout and "language_info" not in ours.stdout
    # nbformat loaded, the grammar's module not (-X importtime lists the refused attempt at `rfc3987_syntax` itself)
    assert re.search(r"\|\s+nbformat$", ours.stderr, re.M) and "rfc3987_syntax.syntax_helpers" not in ours.stderr
