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
    """The notebook tests read results whose experts and encoder the current code made: the smoke book's
    cache folder is named by the package's fingerprint (a fresh one after any code change), and holds
    what the book trained; no other code's folder is left beside it."""
    from conftest import smoke_data_dir
    from mergelab import codeversion

    folder = smoke_data_dir()
    assert folder.name == f"smoke-{codeversion.package_fingerprint()}"
    assert list(folder.rglob("expert-*.safetensors")), f"the smoke book trained no expert into {folder}"
    assert [p.name for p in folder.parent.glob("smoke-*")] == [folder.name]
