"""End to end: `make report PROFILE=smoke` into a temporary folder builds the whole book."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_make_report_smoke_builds_the_book(smoke_report) -> None:
    reports, completed = smoke_report  # `make report PROFILE=smoke REPORTS=<tmp>`, see conftest.py
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]

    assert "renderer: " in completed.stdout  # make report says which renderer it used
    index = reports / "_book" / "index.html"
    assert index.is_file()
    text = index.read_text(encoding="utf-8")
    for chapter in report.book_chapters(ROOT / "reports" / "_quarto.yml"):
        page = Path(chapter).with_suffix(".html").as_posix()
        assert page in text, f"the book's index does not link {page}"
        assert (reports / "_book" / page).is_file()

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks in notebooks/"
    for notebook in notebooks:
        result = reports / "results" / f"{notebook.stem}.json"
        assert result.is_file(), f"{notebook.stem} wrote no results JSON"


@pytest.mark.e2e
def test_the_smoke_book_caches_its_artifacts_under_the_fingerprint_of_the_code_that_made_them(smoke_report) -> None:
    """The notebook tests read results whose experts and encoder the current code made: the smoke book
    trained them into the folder named by the fingerprint of the package as it is now (computed here
    afresh), which changes with any change to the code."""
    from mergelab import codeversion, paths

    folder = paths.data_dir() / "tests" / f"smoke-{codeversion.package_fingerprint()}"
    assert list(folder.rglob("expert-*.safetensors")), f"the smoke book trained no expert into {folder}"
    assert list(folder.rglob("pretrained.safetensors")), f"the smoke book pretrained no encoder into {folder}"
