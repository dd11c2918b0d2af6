"""Parameters of a chapter for a profile: ``params/<profile>/_benchmark.yaml`` (the benchmark block
every chapter of the profile shares) merged with ``params/<profile>/<chapter>.yaml`` (the chapter's own).

The report runner passes them to papermill; :func:`mergelab.notebook.setup` reads which names a
chapter has from the ``tiny`` profile, which its parameters cell holds.
"""

from __future__ import annotations

import ast
import json
import re
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


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: ``lr: 5e-4`` and ``1E3`` are numbers. PyYAML
    follows YAML 1.1, where a float needs a dot (``5.0e-4``), and would pass ``"5e-4"`` on as a string."""


_ParamsLoader.add_implicit_resolver(  # beside YAML 1.1's float rule: the exponent forms it leaves to strings
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ReportError(f"{path} is not valid YAML{where}: {problem}. Fix that line.") from None
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


def notebook_parameters(notebook: Path) -> dict[str, str]:
    """``{name: default's source}`` of the assignments in a notebook's cell tagged ``parameters``
    (empty when it has none)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"])
            return {t.id: ast.get_source_segment(source, node.value) or "" for node in ast.parse(source).body
                    if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    return {}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def check_parameters(notebook: Path, parameters: dict[str, Any], where: str) -> None:
    """Refuse parameters the notebook does not have (naming close matches) and values whose kind
    differs from the default in its parameters cell (a number for a number, a list for a list...,
    a whole number where the default is an integer; a default of ``None`` accepts anything). ``where``: the files the values came from, for the message."""
    import difflib

    declared = notebook_parameters(notebook)
    for key, value in parameters.items():
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ReportError(f"{where}: {Path(notebook).stem} has no parameter {key!r}.{hint} Valid: "
                              f"{', '.join(declared)}.")
        try:
            default = ast.literal_eval(declared[key])
        except (ValueError, SyntaxError):
            continue
        if default is None or value is None:
            continue
        if _kind(value) != _kind(default):
            raise ReportError(f"{where}: parameter {key}={value!r} is a {_kind(value)}; {Path(notebook).stem} "
                              f"expects a {_kind(default)} (its default is {declared[key]}).")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            # every integer default is a count (steps, models, seeds, workers): 3.0 would fail later, far from here
            whole = f"write {int(value)}" if value.is_integer() else "use a whole number"
            raise ReportError(f"{where}: parameter {key}={value!r} is a float; {Path(notebook).stem} expects an "
                              f"integer ({whole}; its default is {declared[key]}).")
