"""mergelab: a small, tested package behind notebooks that reproduce the science of model merging.

Entry points most notebooks need:

* :func:`load_benchmark` - the ``tiny`` (offline) benchmark with the same interface the ``clip`` size has;
* :class:`~mergelab.task_vectors.TaskVector`, :func:`~mergelab.merging.merge`,
  :data:`~mergelab.merging.MERGE_METHODS`;
* :mod:`mergelab.plotting` (one plotting helper) and :mod:`mergelab.notebook` (setup, results, provenance).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on first use (below), so `import mergelab.paths` does not load torch
    from .evaluation import absolute_accuracy, normalized_accuracy
    from .merging import MERGE_METHODS, get_merge, merge, register_merge
    from .task_vectors import TaskVector, task_vectors_from
    from .training import FinetuneConfig, PretrainConfig

__version__ = "0.1.0"

_LAZY = {"absolute_accuracy": "evaluation", "normalized_accuracy": "evaluation", "MERGE_METHODS": "merging",
         "get_merge": "merging", "merge": "merging", "register_merge": "merging", "TaskVector": "task_vectors",
         "task_vectors_from": "task_vectors", "FinetuneConfig": "training", "PretrainConfig": "training"}


def __getattr__(name: str) -> Any:
    """The package's entry points, imported when first used: the report runner, the kernels of the
    report's tests and ``mergelab.paths`` need none of torch, open_clip or torchvision (3-4 s of CPU per
    process)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BENCHMARKS = ("tiny", "clip")


def load_benchmark(name: str = "tiny", device: str | None = "auto", progress: bool = True,
                   **params: Any):
    """The benchmark ``name`` built from plain parameters (as a papermill parameter file gives them).

    ``tiny`` takes ``tasks``, ``data``, ``model``, ``pretrain``, ``head_shots``, ``logit_scale``
    (see :class:`mergelab.benchmarks.tiny.TinyBenchmarkConfig`).
    ``clip`` takes ``tasks``, ``data``, ``model`` (``pretrain`` and ``head_shots`` must be empty) and
    ``checkpoint_every`` (see :class:`mergelab.benchmarks.clip.ClipBenchmarkConfig`).
    """
    if name == "tiny":
        from .benchmarks.tiny import TinyBenchmark, TinyBenchmarkConfig

        return TinyBenchmark(TinyBenchmarkConfig.from_params(**params), device=device, progress=progress)
    if name == "clip":
        from .benchmarks.clip import load_clip_benchmark

        return load_clip_benchmark(device=device, progress=progress, **params)
    raise ValueError(f"benchmark={name!r} is not available; valid: {', '.join(BENCHMARKS)}.")


__all__ = ["BENCHMARKS", "MERGE_METHODS", "FinetuneConfig", "PretrainConfig", "TaskVector", "absolute_accuracy",
           "get_merge", "load_benchmark", "merge", "normalized_accuracy", "register_merge",
           "task_vectors_from"]
