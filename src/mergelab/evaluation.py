"""Evaluation of merged models: per-task accuracy, absolute and normalized accuracy, tidy tables.

A *benchmark* here is any object with ``tasks``, ``evaluate(state, split, tasks) -> {task: acc}``
(:class:`mergelab.benchmark.TinyBenchmark`, and the ``clip`` size's benchmark).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from .merging import MergeResult, absolute_accuracy, merge_with_validation, normalized_accuracy
from .task_vectors import TaskVector
from .utils import StateDict


class Benchmark(Protocol):
    tasks: tuple[str, ...]

    def evaluate(self, state: StateDict, split: str = "test", tasks: Sequence[str] | None = None
                 ) -> dict[str, float]: ...


def summarize(per_task: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> dict[str, Any]:
    """``{"absolute_accuracy", "normalized_accuracy", "per_task_accuracy"}`` (fractions 0..1)."""
    return {"absolute_accuracy": absolute_accuracy(per_task),
            "normalized_accuracy": normalized_accuracy(per_task, expert_accuracy),
            "per_task_accuracy": dict(per_task)}


def expert_accuracy(benchmark: Benchmark, experts: Mapping[str, StateDict], split: str = "test"
                    ) -> dict[str, float]:
    """Each expert's accuracy on its own task: the denominators of normalized accuracy."""
    return {t: benchmark.evaluate(experts[t], split=split, tasks=[t])[t] for t in experts}


def merge_baselines(benchmark: Benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                    methods: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                    progress: bool = True) -> dict[str, MergeResult]:
    """Merge the task vectors with each method, its coefficient chosen on *validation*.

    The validation score is the absolute accuracy over the merged tasks on the validation split
    (the public protocol). ``options[method]`` goes to :func:`mergelab.merging.merge_with_validation`:
    ``grid`` (coefficients tried; default the method's registered grid; ``()`` merges once with the
    given options), ``also_at`` (other coefficients whose states to keep) and the method's own options.
    """
    tasks = list(task_vectors)
    tvs = [task_vectors[t] for t in tasks]

    def score(state: StateDict) -> float:
        return absolute_accuracy(benchmark.evaluate(state, split="val", tasks=tasks))

    options = options or {}
    return {m: merge_with_validation(m, pretrained, tvs, score, progress=progress, **options.get(m, {}))
            for m in tqdm(methods, desc="merge methods", disable=not progress)}


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per method: absolute and normalized accuracy, then one column per task."""
    records = []
    for method, r in rows.items():
        rec = {"method": method, "absolute_accuracy": r["absolute_accuracy"],
               "normalized_accuracy": r["normalized_accuracy"]}
        rec.update({t: a for t, a in r["per_task_accuracy"].items()})
        records.append(rec)
    return pd.DataFrame.from_records(records).set_index("method")


def long_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy ``(method, task, accuracy)`` rows for plotting."""
    return pd.DataFrame([{"method": m, "task": t, "accuracy": a}
                         for m, r in rows.items() for t, a in r["per_task_accuracy"].items()])


def interpolate(pretrained: StateDict, state: StateDict, alpha: float) -> StateDict:
    """``(1 - alpha) * pretrained + alpha * state`` for floating-point entries."""
    return {k: (v + alpha * (state[k] - v)) if torch.is_floating_point(v) else v.clone()
            for k, v in pretrained.items()}
