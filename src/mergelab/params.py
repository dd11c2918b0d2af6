"""Parameters of a chapter for a profile: ``params/<profile>/_benchmark.yaml`` (the benchmark block
every chapter of the profile shares) merged with ``params/<profile>/<chapter>.yaml`` (the chapter's own).

The report runner passes them to papermill; :func:`mergelab.notebook.setup` reads which names a
chapter has from the ``tiny`` profile, which its parameters cell holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import paths


class ReportError(RuntimeError):
    """A problem the user can fix; the message says what went wrong and what to do."""


def params_path(profile: str, notebook: str | Path, params_dir: Path | None = None) -> Path:
    """``<params_dir>/<profile>/<notebook>.yaml`` (default params_dir: ``<root>/params``)."""
    stem = Path(notebook).name.removesuffix(".ipynb")
    if params_dir is None:
        try:
            return paths.params_file(profile, stem)
        except ValueError as err:
            raise ReportError(str(err)) from err
    params_dir = Path(params_dir)
    if profile not in paths.PROFILES and not (params_dir / profile).is_dir():
        raise ReportError(
            f"profile {profile!r} is not a parameter profile; valid: {', '.join(paths.PROFILES)} "
            f"(or any folder under {params_dir})."
        )
    return params_dir / profile / f"{stem}.yaml"


BENCHMARK_PARAMS = "_benchmark.yaml"
"""The file in each profile folder holding the benchmark block every chapter of that profile reads
(``profile``, ``seed``, ``device``, ``benchmark``, ``data``, ``model``, ``pretrain``, ``head_shots``,
``progress``). An ``extends: <profile>`` key in it starts from that profile's block."""


def _yaml_mapping(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ReportError(
            f"{path} must be a YAML mapping of parameter names to values, got {type(values).__name__}."
        )
    return values


def benchmark_param_files(profile_dir: Path) -> list[Path]:
    """The ``_benchmark.yaml`` files a profile folder's chapters read, the extended profile's first."""
    files: list[Path] = []
    folder = Path(profile_dir)
    while (folder / BENCHMARK_PARAMS).is_file():
        path = folder / BENCHMARK_PARAMS
        if path in files:
            raise ReportError(f"{path}: 'extends' goes round in a circle ({' -> '.join(map(str, files))}).")
        files.insert(0, path)
        parent = _yaml_mapping(path).get("extends")
        if parent is None:
            break
        folder = folder.parent / str(parent)
        if not folder.is_dir():
            raise ReportError(f"{path}: extends={parent!r} is not a profile folder beside it.")
    return files


def load_params(path: Path, profile: str, notebook: str) -> dict[str, Any]:
    """Papermill parameters: the profile's benchmark block (:data:`BENCHMARK_PARAMS`) and the chapter's
    own YAML mapping; a clear error when the file is missing, not a mapping, or repeats a key of the
    benchmark block (one home per value)."""
    if not path.is_file():
        raise ReportError(
            f"notebook {notebook} has no parameters for profile {profile!r}: expected {path}. "
            f"Create it with the values for this profile (a YAML mapping; `{{}}` keeps the notebook's "
            f"defaults)."
        )
    shared: dict[str, Any] = {}
    files = benchmark_param_files(path.parent)
    for f in files:
        shared.update({k: v for k, v in _yaml_mapping(f).items() if k != "extends"})
    values = _yaml_mapping(path)
    repeated = sorted(set(values) & set(shared))
    if repeated:
        raise ReportError(
            f"{path} sets {', '.join(repeated)}, which {files[-1]} sets for every chapter of the profile: "
            "keep each value in one place (remove it from the chapter's file)."
        )
    return {**shared, **values}


def profile_params(profile: str, notebook: str, params_dir: Path | None = None) -> dict[str, Any]:
    """The parameters of ``notebook`` for ``profile``: :func:`load_params` of :func:`params_path`."""
    return load_params(params_path(profile, notebook, params_dir), profile,
                       Path(notebook).name.removesuffix(".ipynb"))
