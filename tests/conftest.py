"""Shared fixtures: tiny state dicts built by hand, and isolation of results written by notebooks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergelab.task_vectors import TaskVector


@pytest.fixture(autouse=True, scope="session")
def _results_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never let a test overwrite the user's executed report: results go to a temporary folder."""
    reports = tmp_path_factory.mktemp("reports")
    os.environ.setdefault("MERGELAB_REPORTS_DIR", str(reports))
    os.environ.setdefault("MERGELAB_RESULTS_DIR", str(reports / "results"))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty data cache for tests that check caching."""
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def make_state(seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (4, 3), "b": (4,), "emb": (2, 3)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.fixture
def pretrained() -> dict[str, torch.Tensor]:
    return make_state(0)


@pytest.fixture
def task_vectors(pretrained: dict[str, torch.Tensor]) -> list[TaskVector]:
    return [TaskVector.from_states(pretrained, make_state(s)) for s in (1, 2, 3)]


NOTEBOOKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="session")
def run_notebook(tmp_path_factory: pytest.TempPathFactory):
    """Execute a notebook once per test session with ``params/smoke``; return its results JSON.

    Usage: ``results = run_notebook("00_benchmark_and_baselines")``. The executed notebook lands in a
    temporary reports folder, never in the user's ``reports/``.
    """
    import json

    from mergelab import paths, report

    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            reports = tmp_path_factory.mktemp(f"nb-{name}")
            nb = paths.notebooks_dir() / f"{name}.ipynb"
            params = report.load_params(report.params_path("smoke", name), "smoke", name)
            report.execute_notebook(nb, params, reports)
            done[name] = json.loads((reports / "results" / f"{name}.json").read_text())
            done[name]["_executed_notebook"] = str(reports / f"{name}.ipynb")
        return done[name]

    return run
