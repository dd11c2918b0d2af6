"""mergelab: a small, tested package behind notebooks that reproduce the science of model merging.

Entry points most notebooks need:

* :func:`load_benchmark` - the ``tiny`` (offline) benchmark with the same interface the ``clip`` size has;
* :class:`~mergelab.task_vectors.TaskVector`, :func:`~mergelab.merging.merge`,
  :data:`~mergelab.merging.MERGE_METHODS`;
* :mod:`mergelab.plotting` (one plotting helper) and :mod:`mergelab.notebook` (setup, results, provenance).
"""

from __future__ import annotations

from typing import Any

from .evaluation import absolute_accuracy, normalized_accuracy
from .merging import MERGE_METHODS, get_merge, merge, register_merge
from .task_vectors import TaskVector, task_vectors_from
from .training import FinetuneConfig, PretrainConfig

__version__ = "0.1.0"

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
