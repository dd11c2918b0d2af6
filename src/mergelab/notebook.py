"""What every notebook does at its start and end: setup, results and provenance.

``setup`` seeds, picks the device, sets the plot style and prints them; ``write_results`` writes the
notebook's numbers to ``<results>/<notebook>.json`` atomically, with a provenance block (versions,
parameters, device, git commit, wall time) that ``provenance`` also prints in the closing cell.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import paths
from .plotting import set_style
from .utils import atomic_write_json, pick_device, seed_everything

_PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "scipy", "scikit-learn", "pandas",
             "seaborn", "matplotlib", "safetensors", "papermill", "mergelab")


@dataclass
class Session:
    """State of one notebook run: name, parameters, device, seed and start time."""

    notebook: str
    parameters: dict[str, Any]
    device: torch.device
    seed: int
    started: float = field(default_factory=time.perf_counter)

    def wall_time_s(self) -> float:
        return time.perf_counter() - self.started


def setup(notebook: str, parameters: dict[str, Any], seed: int = 0, device: str | None = "auto") -> Session:
    """Seed everything, pick the device, set the plot style, print them; return the session."""
    seed_everything(seed)
    dev = pick_device(device)
    set_style()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"notebook: {notebook} | device: {dev} | seed: {seed} | torch {torch.__version__}")
    return Session(notebook, dict(parameters), dev, seed)


def git_commit() -> str:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), or ``"unknown"``."""
    try:
        root = paths.project_root()
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Installed versions of the packages the results depend on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(session: Session) -> dict[str, Any]:
    """Versions, parameters, device, git commit and wall time of this run."""
    device = str(session.device)
    if session.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(session.device)})"
    return {"notebook": session.notebook, "parameters": session.parameters, "device": device,
            "seed": session.seed, "git_commit": git_commit(), "versions": versions(),
            "platform": platform.platform(), "wall_time_s": round(session.wall_time_s(), 2)}


def write_results(session: Session, results: dict[str, Any]) -> Path:
    """Write ``results`` plus provenance to ``<results>/<notebook>.json`` atomically; return the path."""
    path = paths.results_dir() / f"{session.notebook}.json"
    atomic_write_json(path, {**results, "provenance": provenance(session)})
    return path


def read_results(notebook: str) -> dict[str, Any]:
    """The numbers an executed notebook wrote (clear error if it has not run)."""
    path = paths.results_dir() / f"{notebook}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results for {notebook!r} at {path}; run `make report` "
                                f"(or `make report NOTEBOOKS={notebook}`) first.")
    return json.loads(path.read_text())


def print_provenance(session: Session) -> None:
    """The closing provenance cell: print what :func:`provenance` records."""
    print(json.dumps(provenance(session), indent=2, default=str))
