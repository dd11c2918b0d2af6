"""Every notebook runs with ``params/smoke`` and writes sane results; notebooks are committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import NOTEBOOKS
from mergelab import report

ROOT = Path(__file__).resolve().parents[1]


def _accuracies(node, path=""):
    """Yield (path, value) for every key that names an accuracy, anywhere in the results."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "accuracy" in k:
                yield f"{path}/{k}", float(v)
            elif k.endswith("per_task_accuracy") and isinstance(v, dict):
                for t, a in v.items():
                    yield f"{path}/{k}/{t}", float(a)
            else:
                yield from _accuracies(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _accuracies(v, f"{path}[{i}]")


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
    accs = list(_accuracies(results))
    for where, value in accs:
        if "normalized" in where:
            assert value >= 0.0, where
        else:
            assert 0.0 <= value <= 1.0, where
