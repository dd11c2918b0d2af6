"""What every notebook does at its start and end: setup, results and provenance.

``setup`` seeds, picks the device, sets the plot style and prints them; ``write_results`` writes the
notebook's numbers to ``<results>/<notebook>.json`` atomically, with a provenance block (versions,
parameters, device, git commit, wall time) that ``provenance`` also prints in the closing cell.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import paths
from .plotting import set_style
from .utils import atomic_write_json, pick_device, seed_everything

if TYPE_CHECKING:
    from .benchmarks import Benchmark
    from .executors import Executor

_PACKAGES = ("torch", "torchvision", "open_clip_torch", "numpy", "scipy", "scikit-learn", "pandas",
             "seaborn", "matplotlib", "safetensors", "papermill", "mergelab")


@dataclass
class Session:
    """State of one notebook run: name, parameters, device, seed and start time; :attr:`bench` is the
    benchmark the parameters describe, built on first use."""

    notebook: str
    parameters: dict[str, Any]
    device: torch.device
    seed: int
    started: float = field(default_factory=time.perf_counter)

    def wall_time_s(self) -> float:
        return time.perf_counter() - self.started

    @functools.cached_property
    def bench(self) -> Benchmark:
        """The benchmark of ``parameters`` (``benchmark``, ``tasks``, ``data``, ``model``, ``pretrain``,
        ``head_shots``, ``progress``) on :attr:`device`."""
        from . import load_benchmark

        p = self.parameters
        return load_benchmark(p["benchmark"], device=str(self.device), progress=p.get("progress", True),
                              tasks=p["tasks"], data=p["data"], model=p["model"], pretrain=p["pretrain"],
                              head_shots=p["head_shots"])


    @functools.cached_property
    def executor(self) -> Executor:
        """Where the chapter's sweeps run (:func:`mergelab.executors.make_executor` of the parameters
        ``executor``, ``workers``, ``threads``, ``resources`` and ``ray_address``; local, in this
        process, for a chapter without them)."""
        from .executors import make_executor

        p = self.parameters
        return make_executor(p.get("executor", "local"), workers=p.get("workers", 1), threads=p.get("threads", 1),
                             resources=p.get("resources"), ray_address=p.get("ray_address"))


def setup(notebook: str, namespace: Mapping[str, Any]) -> Session:
    """Start a chapter: take its parameters from ``namespace`` (the notebook's ``globals()``), seed
    everything, pick the device, set the plot style and print them; return the session.

    The chapter's parameters are the names its ``tiny`` profile sets (``params/tiny``, which its
    parameters cell holds; a test keeps the two equal), so the list is written once.
    """
    from .params import check_parameters, profile_params

    names = list(profile_params("tiny", notebook))
    missing = [n for n in names if n not in namespace]
    if missing:
        raise ValueError(f"setup({notebook!r}) needs the parameters {', '.join(missing)}: run the parameters cell "
                         "first (they are the keys of params/tiny for this chapter).")
    parameters = {n: namespace[n] for n in names}
    # the report runner checks the parameter files; a value set in JupyterLab or by `papermill -p` is checked here
    check_parameters(paths.notebooks_dir() / f"{notebook}.ipynb", parameters, f"{notebook}'s parameters")
    interactive = use_lab_folder()
    seed, device = int(parameters["seed"]), parameters["device"]
    seed_everything(seed)
    dev = pick_device(device)
    set_style()
    print(f"notebook: {notebook} | profile: {parameters.get('profile')} | device: {dev} | seed: {seed} | "
          f"torch {torch.__version__}")
    if interactive:
        print(f"interactive run: figures and results go to {paths.reports_dir()}, not to the book's folder "
              "(`make report` writes the book's numbers).")
    return Session(notebook, parameters, dev, seed)


LAB_FOLDER = "lab"
"""Sub-folder of ``reports/`` where interactive runs (JupyterLab) write their figures and results."""


def use_lab_folder() -> bool:
    """Send this kernel's figures and results to ``reports/lab/`` unless a runner chose a folder.

    ``make report`` (and the tests) set ``MERGELAB_REPORTS_DIR`` for the kernels they start. A notebook
    run by hand, in JupyterLab, has no such variable: without this its figures and results would
    overwrite the book's, which would then no longer match its executed notebooks. Returns whether
    the lab folder is used."""
    import os

    if os.environ.get("MERGELAB_REPORTS_DIR"):
        return False
    lab = paths.project_root() / "reports" / LAB_FOLDER
    os.environ["MERGELAB_REPORTS_DIR"] = str(lab)
    os.environ.setdefault("MERGELAB_RESULTS_DIR", str(lab / "results"))
    return True


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
    """Versions, parameters, device, torch's thread count (``torch_threads``: sums reduced across threads may
    differ in their last bits at another count), git commit and wall time of this run, and the SHA-256 of the
    pretrained weights when the run built a benchmark that pretrains its own (``tiny``)."""
    device = str(session.device)
    if session.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(session.device)})"
    out = {"notebook": session.notebook, "parameters": session.parameters, "device": device,
           "torch_threads": torch.get_num_threads(), "seed": session.seed, "git_commit": git_commit(), "versions": versions(),
           "platform": platform.platform(), "wall_time_s": round(session.wall_time_s(), 2)}
    bench = session.__dict__.get("bench")  # only when this run built it (chapter 06 trains its own models)
    sha = getattr(bench, "pretrained_sha256", None) if bench is not None else None
    if sha:  # which pretrained weights the run used: the same seed gives the same weights only on the same build
        out["pretrained_sha256"] = sha
    return out


def write_results(session: Session, results: dict[str, Any]) -> Path:
    """Write ``results`` plus provenance to ``<results>/<notebook>.json`` atomically; return the path.

    The file is strict JSON: a number that is not finite (a NaN from an undefined statistic, say) is
    written as ``null``."""
    path = paths.results_dir() / f"{session.notebook}.json"
    atomic_write_json(path, {**results, "provenance": provenance(session)}, strict=True)
    return path


SIZES = ("tiny", "clip")
"""Benchmark sizes a notebook's prose can differ for (``benchmark`` parameter of every notebook)."""


def for_size(benchmark: str, **texts: str) -> Any:
    """The paragraph that applies to the running benchmark size, as Markdown to ``display``.

    ``for_size(benchmark, tiny="...", clip="...")``: notebooks run unchanged at every size, and a
    statement that holds for one size only (how its data are made, where its encoder comes from) is
    written once per size and chosen here. Texts are dedented and stripped.
    """
    import textwrap

    from IPython.display import Markdown

    missing = [s for s in SIZES if s not in texts]
    if missing or set(texts) - set(SIZES):
        raise ValueError(f"for_size needs one text per size: {', '.join(SIZES)}; got {', '.join(texts)}.")
    if benchmark not in texts:
        raise ValueError(f"benchmark={benchmark!r} is not valid; use one of {', '.join(SIZES)}.")
    return Markdown(textwrap.dedent(texts[benchmark]).strip())


def stand_in_note(benchmark: str, data: dict[str, Any], model: dict[str, Any]) -> str:
    """What a clip-size run is not, in a sentence or two: stand-ins (synthetic datasets or a randomly
    initialized model, as the ``clip_smoke`` profile uses) and capped splits; ``""`` for the
    benchmark as published and for the other sizes."""
    if benchmark != "clip":
        return ""
    notes, parts = [], []
    if data.get("synthetic"):
        parts.append("synthetic stand-ins for the datasets (`data.synthetic`)")
    if model.get("pretrained", "openai") is None:
        parts.append(f"a randomly initialized `{model.get('name', 'ViT-B-32')}` (`model.pretrained: null`)")
    if parts:
        notes.append(f"**This run uses {' and '.join(parts)}**, as the `clip_smoke` profile does: it checks the "
                     "code path, and its numbers mean nothing.")
    caps = {k: data[k] for k in ("max_train", "max_val", "max_test") if data.get(k)}
    if caps:
        notes.append("Its splits are capped (" + ", ".join(f"`{k}: {v}`" for k, v in caps.items())
                     + "): seeded subsets, not the benchmark as published.")
    return " ".join(notes)


def pretraining_line(log: Mapping[str, Any]) -> str:
    """One line on where the pretrained encoder came from, from its log (``bench.pretraining_log()``):
    shipped with mergelab, pretrained here (steps and seconds), or no pretraining run (the clip size)."""
    steps = len(log.get("loss", []))
    if log.get("shipped"):
        return (f"pretraining: shipped with mergelab ({steps} steps, made by this code in {log['wall_time_s']:.0f} s; "
                "MERGELAB_PRETRAIN=1 with an empty data folder pretrains it here)")
    if steps:
        return f"pretraining: {steps} steps in {log['wall_time_s']:.0f} s (cached after the first run)"
    return f"no pretraining run here: {log.get('source', 'pretrained weights')}"


def finetuning_line(logs: Sequence[Mapping[str, Any]], trained: int) -> str:
    """One line on where a chapter's fine-tuning runs came from: ``logs`` their training logs (the
    artifacts' sidecars, ``bench.expert_log``), ``trained`` how many of them this run trained. Runs shipped
    with mergelab (:mod:`mergelab.benchmarks.tiny.ship`) are counted with the seconds it took to make them."""
    shipped = [log for log in logs if log.get("shipped")]
    seconds = sum(float(log.get("wall_time_s", 0.0)) for log in shipped)
    parts = []
    if shipped:
        parts.append(f"{len(shipped)} shipped with mergelab (made by this code: {seconds:.0f} s of training, one thread "
                     "per run; MERGELAB_FINETUNE=1 with an empty data folder trains them here)")
    if trained:
        parts.append(f"{trained} trained here")
    cached = len(logs) - len(shipped) - trained
    if cached > 0:
        parts.append(f"{cached} from the cache or imported")
    return f"fine-tuning runs: {len(logs)}: " + ", ".join(parts)


def print_provenance(session: Session) -> None:
    """The closing provenance cell: print what :func:`provenance` records."""
    print(json.dumps(provenance(session), indent=2, default=str))


def times_phrase(value: float, reference: float, fewer: str = "fewer", more: str = "more",
                 same: str = "as many") -> str:
    """``value`` against ``reference`` as prose: ``"3.3x fewer"`` when smaller, ``"1.2x more"`` when larger (the
    ratio of the larger to the smaller, one decimal under 10, none from 10 on), ``same`` when equal. Both must be
    positive counts or costs (e.g. forward passes); the words are the caller's."""
    if not (value > 0 and reference > 0):
        raise ValueError(f"value={value!r}, reference={reference!r} are not valid; use two positive numbers.")
    if value == reference:
        return same
    ratio = max(value, reference) / min(value, reference)
    times = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
    return f"{times} {fewer if value < reference else more}"


def main_result(headline: str, claims: Sequence[Mapping[str, Any]], notebook: str,
                undecided: str = "not decided at this size") -> str:
    """Markdown of a chapter's closing "Main result of this run": ``headline`` (the run's main numbers,
    formatted by the chapter from its results), how many of ``claims`` (``{claim, status, ...}``) were
    reproduced, the claims not reproduced and those ``undecided`` (``not_testable``), and where the
    numbers are (``reports/results/<notebook>.json``)."""
    by = {s: [c["claim"].strip().rstrip(".") for c in claims if c["status"] == s]
          for s in ("reproduced", "not_reproduced", "not_testable")}
    text = f"**Main result of this run**: {headline}; {len(by['reproduced'])} of {len(claims)} claims reproduced"
    if by["not_reproduced"]:
        text += f"; not reproduced: {'; '.join(by['not_reproduced'])}"
    if by["not_testable"]:
        text += f"; {undecided}: {'; '.join(by['not_testable'])}"
    text += "."
    return text + f" The numbers behind every figure are in `reports/results/{notebook}.json`."
