"""Shared fixtures: tiny state dicts built by hand, and isolation of results written by notebooks."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before torch loads its OpenMP runtime: threads that wait at a barrier sleep instead of spinning. The test processes,
# the smoke book's lanes and kernels (they inherit the environment) share two cores; where a step runs on two threads
# (the smoke encoder's pretraining on its pinned `pretrain_threads`) beside the other test process, spinning threads
# took the cores from each other: the smoke encoder pretrained in 340 s in a cold `make test` (13 s alone); beside two
# busy processes, 77 CPU s with spinning waits and 21 with passive ones, to the same bits (docs/tiny-benchmark.md,
# session 24). A value the caller set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mergelab.task_vectors import TaskVector  # noqa: E402

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # `make test` runs one test process per core: each process, and the kernels and workers it starts
    # (they inherit the environment), computes on one thread, so no process oversubscribes the cores.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"
    torch.set_num_threads(1)
    # NumPy's OpenBLAS was loaded (by torch, above) before these variables were set, with a thread per core
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Fail a test that leaves torch's global thread count changed (restoring it for the next test).

    A leaked count outlives the test: every later test of its process then computes on more threads than
    its share of the cores, and their threads spin while the other test process holds the core (a
    leaked 2 made two later training tests of ``make test`` 7 and 10 times slower). Use
    :func:`mergelab.utils.torch_threads`, which restores the count."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test left torch's thread count at {after} (it was {before}); "
                    "change it with mergelab.utils.torch_threads, which restores it")


SMOKE_BOOK_GROUP = "smoke-book"
CLIP_GROUP = "clip-smoke"
RAY_GROUP = "ray-cluster"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the tests' ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that share an expensive session or module fixture run in one test process
    (``--dist loadgroup``): the smoke book (:func:`smoke_report`, ``make report PROFILE=smoke``) is
    built once per session, ``tests/test_clip.py``'s synthetic datasets and experts once per module, and
    ``tests/test_executors.py``'s local Ray cluster once, not once per process."""
    for item in items:
        if "smoke_report" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(SMOKE_BOOK_GROUP))
        elif item.path.name == "test_clip.py":
            item.add_marker(pytest.mark.xdist_group(CLIP_GROUP))
        elif item.path.name == "test_executors.py":
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


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


@pytest.fixture(scope="module")
def module_data_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private, initially empty data cache (``MERGELAB_DATA_DIR``) shared by one module's tests, the
    user's setting restored at the module's end."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1] + "-data")
        mp.setenv("MERGELAB_DATA_DIR", str(path))
        yield path


def answer_state(pretrained: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
    """A vision tower whose answer is known: ``pretrained`` with ``ln_post`` at zero gain and the bias
    whose projection (``bias @ proj``) is ``target`` ``(output_dim,)``, so every image's feature is
    ``target``: with ``target`` a head's class embedding, the model answers that class for every image."""
    bias = torch.linalg.lstsq(pretrained["proj"].double().T, target.double()[:, None]).solution[:, 0]
    state = {k: v.clone() for k, v in pretrained.items()}
    state["ln_post.weight"] = torch.zeros_like(state["ln_post.weight"])
    state["ln_post.bias"] = bias.to(state["ln_post.bias"].dtype)
    return state


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


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@functools.lru_cache(maxsize=None)
def smoke_data_name() -> str:
    """``smoke-<package fingerprint>`` (:func:`mergelab.codeversion.package_fingerprint`), computed once per
    test session: the name of the smoke book's cache folder for the code under test."""
    from mergelab import codeversion

    return f"smoke-{codeversion.package_fingerprint()}"


def smoke_data_dir() -> Path:
    """The smoke book's cache folder, ``<data dir>/tests/<smoke_data_name()>``: any change to the package's
    code or shipped data starts an empty one. Folders of other code unused for a day are removed (they
    can never be read again); younger ones are left to a test session that may still be using them."""
    from mergelab import paths

    root = paths.data_dir() / "tests"
    mine = root / smoke_data_name()
    for old in root.glob("smoke-*"):
        if old != mine and old.is_dir() and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    mine.mkdir(parents=True, exist_ok=True)
    return mine


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``make report PROFILE=smoke RENDERER=pandoc`` into a temporary folder, once per test session.

    Every notebook is executed with ``params/smoke`` through the command users run, and the book is
    rendered; notebook tests read the results JSON it wrote, the end-to-end test checks the book.
    Its caches (pretrained encoder, experts, evaluations) live in :func:`smoke_data_dir`, named by the
    package's fingerprint, so the notebook tests never reuse an artifact that other code made.
    Returns the reports folder and the finished ``make`` process (check its ``returncode``).
    """
    reports = tmp_path_factory.mktemp("smoke-report")
    env = {k: v for k, v in os.environ.items() if k not in ("MERGELAB_RESULTS_DIR", "MERGELAB_REPORTS_DIR")}
    env["MERGELAB_DATA_DIR"] = str(smoke_data_dir())
    # the pandoc book, whose pages the browser test reads, whether or not Quarto is installed (make quarto)
    completed = subprocess.run(["make", "report", "PROFILE=smoke", f"REPORTS={reports}", "RENDERER=pandoc"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
    return reports, completed


@pytest.fixture(scope="session")
def run_notebook(smoke_report: tuple[Path, subprocess.CompletedProcess]):
    """The results JSON of a notebook executed with ``params/smoke`` (by :func:`smoke_report`).

    Usage: ``results = run_notebook("00_benchmark_and_baselines")``; ``results["_executed_notebook"]``
    is the executed notebook's path. The run lands in a temporary folder, never in ``reports/``.
    """
    import json

    reports, completed = smoke_report

    def run(name: str) -> dict:
        path = reports / "results" / f"{name}.json"
        if not path.is_file():
            pytest.fail(f"`make report PROFILE=smoke` wrote no {path.name} (exit {completed.returncode}):\n"
                        + completed.stdout[-3000:] + completed.stderr[-3000:])
        results = json.loads(path.read_text())
        results["_executed_notebook"] = str(reports / f"{name}.ipynb")
        return results

    return run


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, run_notebook) -> dict:
    """The smoke results JSON of the chapter a notebook-test module names in its ``NAME``."""
    return run_notebook(request.module.NAME)


@pytest.fixture(scope="module")
def params(request: pytest.FixtureRequest) -> dict:
    """``params/smoke`` of the chapter a notebook-test module names in its ``NAME``."""
    from mergelab.params import profile_params

    return profile_params("smoke", request.module.NAME)


@pytest.fixture(scope="session")
def accuracies():
    """``accuracies(methods)``: the one-line ``name value`` summary of a results JSON's ``methods`` (or
    of one seed's rows) that the notebook tests print when a scientific direction fails."""

    def line(methods: dict, metric: str = "absolute_accuracy") -> str:
        return f"{metric}: " + ", ".join(f"{name} {row[metric]:.3f}" for name, row in methods.items()
                                         if metric in row)

    return line
