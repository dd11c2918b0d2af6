"""Where mergelab reads and writes: the project root, the data cache, the report and its results.

Every location can be moved with an environment variable, so tests and users can redirect the
expensive caches or the generated report without editing code:

* ``MERGELAB_HOME``: project root (default: the checkout this package lives in, else the cwd).
* ``MERGELAB_DATA_DIR``: caches and generated data (default ``<root>/data``).
* ``MERGELAB_REPORTS_DIR``: executed notebooks and the book (default ``<root>/reports``).
* ``MERGELAB_RESULTS_DIR``: JSON results of executed notebooks (default ``<reports>/results``).

A relative path is read from the working directory of ``make report`` (:func:`absolute_dir_variables`), not from
the notebooks' folder where the chapters' kernels run.
"""

from __future__ import annotations

import os
from pathlib import Path

KERNEL_NAME = "mergelab"
"""Name of the Jupyter kernel the Makefile installs into the project's environment; papermill is
always called with it."""

PROFILES = ("smoke", "tiny", "tiny_full", "clip", "clip_smoke")
"""Papermill parameter profiles: ``params/<profile>/<notebook>.yaml``."""


def project_root() -> Path:
    """The project root: ``$MERGELAB_HOME``, else the checkout holding this package, else the cwd."""
    env = os.environ.get("MERGELAB_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").is_file() and (here / "src" / "mergelab").is_dir():
        return here
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "notebooks").is_dir():
            return candidate
    return cwd


def _dir_from_env(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    path = Path(value).expanduser() if value else default
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


DIR_VARIABLES = ("MERGELAB_HOME", "MERGELAB_DATA_DIR", "MERGELAB_REPORTS_DIR", "MERGELAB_RESULTS_DIR",
                 "MERGELAB_CLIP_DATA_ROOT", "MERGELAB_CLIP_WEIGHTS_DIR", "MERGELAB_CLIP_EXPERTS_DIR")
"""Environment variables that name folders: the project's (:func:`project_root`, :func:`data_dir`,
:func:`reports_dir`, :func:`results_dir`) and the ``clip`` size's datasets, open_clip weights and imported experts."""


def absolute_dir_variables() -> None:
    """Rewrite each of :data:`DIR_VARIABLES` that holds a relative path as the absolute path it names from this
    process's working directory. Kernels run in the notebooks' folder: without this, ``MERGELAB_DATA_DIR=cache``
    would be ``./cache`` for the report and ``notebooks/cache`` for every chapter, two caches instead of one."""
    for var in DIR_VARIABLES:
        value = os.environ.get(var)
        if value and not Path(value).expanduser().is_absolute():
            os.environ[var] = str(Path(value).expanduser().resolve())


def data_dir() -> Path:
    """Cache for generated datasets, pretrained weights and fine-tuned experts (ignored by git)."""
    return _dir_from_env("MERGELAB_DATA_DIR", project_root() / "data")


def reports_dir() -> Path:
    """Folder of the Quarto book: executed notebooks, figures, results."""
    return _dir_from_env("MERGELAB_REPORTS_DIR", project_root() / "reports")


def results_dir() -> Path:
    """Folder where each executed notebook writes ``<notebook>.json`` with its numbers."""
    return _dir_from_env("MERGELAB_RESULTS_DIR", reports_dir() / "results")


def notebooks_dir() -> Path:
    """The committed, output-free notebooks."""
    return project_root() / "notebooks"


def params_file(profile: str, notebook: str) -> Path:
    """``params/<profile>/<notebook>.yaml``; raises a clear error for an unknown profile."""
    if profile not in PROFILES and not (project_root() / "params" / profile).is_dir():
        raise ValueError(
            f"PROFILE={profile!r} is not a parameter profile; valid: {', '.join(PROFILES)} "
            f"(or any folder under params/)."
        )
    return project_root() / "params" / profile / f"{notebook}.yaml"
