"""Evaluation of merged models: per-task accuracy, absolute and normalized accuracy, tidy tables.

Only ``tasks`` and ``evaluate(state, split, tasks) -> {task: acc}`` of a benchmark are used here
(:class:`mergelab.benchmarks.Benchmark`).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .merging import MergeResult, merge_with_validation
from .task_vectors import TaskVector
from .utils import StateDict

if TYPE_CHECKING:
    from .benchmarks.base import Benchmark


def absolute_accuracy(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks of top-1 accuracy (fractions 0..1)."""
    if not per_task:
        raise ValueError("per_task accuracies are empty.")
    _check_fractions("per_task", per_task)
    return float(np.mean(list(per_task.values())))


def _check_fractions(name: str, accuracies: Mapping[str, float]) -> None:
    """Refuse an accuracy that is not a fraction in [0, 1] (a percentage such as 95 would pass silently)."""
    for task, a in accuracies.items():
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a <= 1:
            raise ValueError(f"{name}[{task!r}]={a!r} is not valid; accuracies are fractions in [0, 1] (95 % is 0.95).")


def normalized_accuracy(per_task: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> float:
    """Mean over tasks of ``merged accuracy on t / expert t's accuracy on t`` (a mean of ratios)."""
    missing = [t for t in per_task if t not in expert_accuracy]
    if missing:
        raise ValueError(f"no expert accuracy for task {missing[0]!r}; have: {', '.join(expert_accuracy)}.")
    if not per_task:
        raise ValueError("per_task accuracies are empty.")
    _check_fractions("per_task", per_task)
    _check_fractions("expert_accuracy", {t: expert_accuracy[t] for t in per_task})
    zero = [t for t in per_task if expert_accuracy[t] == 0]
    if zero:
        raise ValueError(f"expert_accuracy[{zero[0]!r}] is 0: normalized accuracy is undefined for that task (it divides "
                         "by the expert's accuracy); report absolute accuracy, or leave the task out.")
    return float(np.mean([per_task[t] / expert_accuracy[t] for t in per_task]))


def summarize(per_task: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> dict[str, Any]:
    """``{"absolute_accuracy", "normalized_accuracy", "per_task_accuracy"}`` (fractions 0..1)."""
    return {"absolute_accuracy": absolute_accuracy(per_task),
            "normalized_accuracy": normalized_accuracy(per_task, expert_accuracy),
            "per_task_accuracy": dict(per_task)}


def expert_accuracy(benchmark: "Benchmark", experts: Mapping[str, StateDict], split: str = "test"
                    ) -> dict[str, float]:
    """Each expert's accuracy on its own task: the denominators of normalized accuracy."""
    return {t: benchmark.evaluate(experts[t], split=split, tasks=[t])[t] for t in experts}


VALIDATION_METRICS = ("normalized", "absolute")
"""How :func:`merge_baselines` scores a merge on validation."""


def merge_baselines(benchmark: "Benchmark", pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                    methods: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                    progress: bool = True, metric: str = "normalized",
                    expert_val: Mapping[str, float] | None = None) -> dict[str, MergeResult]:
    """Merge the task vectors with each method, its coefficient chosen on *validation*.

    The validation score is the normalized accuracy over the merged tasks on the validation split
    (each task's accuracy divided by its expert's validation accuracy ``expert_val``), as the official
    TSV code chooses; ``metric="absolute"`` uses the plain mean accuracy instead. ``options[method]``
    goes to :func:`mergelab.merging.merge_with_validation`: ``grid`` (coefficients tried; default the
    method's registered grid, which includes 0; ``()`` merges once with the given options),
    ``also_at`` (other coefficients whose states to keep) and the method's own options.
    """
    if metric not in VALIDATION_METRICS:
        raise ValueError(f"metric={metric!r} is not valid; use one of {', '.join(VALIDATION_METRICS)}.")
    if not isinstance(task_vectors, Mapping):
        raise ValueError(f"task_vectors is a {type(task_vectors).__name__}; pass a {{task: TaskVector}} mapping "
                         "(e.g. task_vectors_from(pretrained, experts)).")
    if isinstance(methods, str):
        raise ValueError(f"methods={methods!r} is not valid; give a list of method names, e.g. [{methods!r}].")
    unused = sorted(set(options or {}) - set(methods))
    if unused:  # a typo would otherwise run the method with its defaults, silently
        raise ValueError(f"options has {unused[0]!r}, which is not in methods={list(methods)!r}; name a method "
                         "that runs.")
    tasks = list(task_vectors)
    if metric == "normalized":
        missing = [t for t in tasks if expert_val is None or t not in expert_val]
        if missing:
            raise ValueError(f"metric='normalized' needs expert_val, the experts' validation accuracy, for every "
                             f"task; missing: {', '.join(missing)}. Pass expert_accuracy(bench, experts, 'val'), "
                             "or metric='absolute'.")
        bad = [t for t in tasks if isinstance(expert_val[t], bool) or not 0 <= float(expert_val[t]) <= 1]
        if bad:  # NaN fails this too
            raise ValueError(f"expert_val[{bad[0]!r}]={expert_val[bad[0]]!r} is not valid; use accuracies as "
                             "fractions in [0, 1].")
        undefined = [t for t in tasks if not expert_val[t] > 0]
        if undefined:  # an expert at 0 on validation (tiny smoke-test splits): normalizing is undefined there
            print(f"merge_baselines: the expert of {', '.join(undefined)} scores 0 on validation, so normalized "
                  "accuracy is undefined; coefficients are chosen by absolute accuracy instead.")
            metric = "absolute"
    tvs = [task_vectors[t] for t in tasks]

    def score(state: StateDict) -> float:
        per_task = benchmark.evaluate(state, split="val", tasks=tasks)
        return normalized_accuracy(per_task, expert_val) if metric == "normalized" else absolute_accuracy(per_task)

    options = options or {}
    return {m: merge_with_validation(m, pretrained, tvs, score, progress=progress, **options.get(m, {}))
            for m in tqdm(methods, desc="merge methods", disable=not progress)}


def merge_row(benchmark: "Benchmark", result: MergeResult, expert_accuracy: Mapping[str, float],
              split: str = "test", state: StateDict | None = None, coefficient: float | None = None) -> dict[str, Any]:
    """The results row of one merge: :func:`summarize` of its accuracy on ``split``, its coefficient and
    its validation sweep. ``state``/``coefficient``: another state of the same merge (e.g. a
    data-free default kept with ``also_at``) instead of the validated one; the sweep is then omitted."""
    if state is None:
        return {**summarize(benchmark.evaluate(result.state, split), expert_accuracy),
                "coefficient": result.coefficient, "at_grid_edge": result.at_grid_edge,
                "validation_sweep": result.sweep}
    return {**summarize(benchmark.evaluate(state, split), expert_accuracy), "coefficient": coefficient}


def merge_rows(benchmark: "Benchmark", results: Mapping[str, MergeResult], expert_accuracy: Mapping[str, float],
               split: str = "test") -> dict[str, dict[str, Any]]:
    """:func:`merge_row` of every merge, by method name (in the order given)."""
    return {name: merge_row(benchmark, result, expert_accuracy, split) for name, result in results.items()}


def results_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per method: absolute and normalized accuracy; where some row has a ``coefficient`` (a merge
    row, :func:`merge_row`), its ``coefficient`` and ``at_grid_edge`` (True when chosen at an end of its
    validation grid; empty for a row with no grid); then one column per task."""
    with_coefficient = any("coefficient" in r for r in rows.values())
    records = []
    for method, r in rows.items():
        rec = {"method": method, "absolute_accuracy": r["absolute_accuracy"],
               "normalized_accuracy": r["normalized_accuracy"]}
        if with_coefficient:
            c = r.get("coefficient")
            rec.update({"coefficient": float("nan") if c is None else c, "at_grid_edge": r.get("at_grid_edge", "")})
        rec.update({t: a for t, a in r["per_task_accuracy"].items()})
        records.append(rec)
    return pd.DataFrame.from_records(records).set_index("method")


def grid_end(coefficient: float, grid: Any) -> str:
    """Which end of its validation ``grid`` (its coefficients: a list, or a sweep's ``{coefficient: score}``) a
    coefficient chosen at an edge lies at: ``"bottom"`` (the smallest; 0 in the package's grids: no merge beat the
    pretrained model on validation) or ``"top"`` (the best may lie beyond the grid)."""
    return "bottom" if coefficient <= min(float(c) for c in grid) else "top"


def grid_edge_note(rows: Mapping[str, Mapping[str, Any]], names: Mapping[str, str] | None = None) -> str:
    """A sentence for a chapter's text naming the rows whose coefficient was chosen at an end of its validation
    grid (``at_grid_edge``, as :func:`merge_row` records it), with the coefficient: at the top the best
    coefficient may lie beyond the grid; at the bottom (0 in the package's grids) no merge beat the pretrained
    model on validation. ``names``: how to call each row (default its key). Only rows chosen on a grid of two or
    more values count (a coefficient, and a ``validation_sweep`` of 2+ values where the row keeps one). Says so
    when every choice is inside its grid; empty when no row was chosen on a grid."""
    graded = {}
    for key, r in rows.items():
        sweep = r.get("validation_sweep")
        if (isinstance(r.get("at_grid_edge"), (bool, np.bool_)) and r.get("coefficient") is not None
                and (sweep is None or len(sweep) >= 2)):
            graded[key] = r
    if not graded:
        return ""
    top, bottom, other = [], [], []
    for key, r in graded.items():
        if not r["at_grid_edge"]:
            continue
        label = f"{(names or {}).get(key, key)} ({r['coefficient']:g})"
        sweep = r.get("validation_sweep")
        (other if not sweep else bottom if grid_end(r["coefficient"], sweep) == "bottom" else top).append(label)
    if not (top or bottom or other):
        return "Every coefficient was chosen inside its validation grid."
    parts = []
    if top:
        parts.append(f"at the top of its validation grid: {', '.join(top)}; the best coefficient may lie beyond it, so "
                     "a wider grid could do better")
    if bottom:
        parts.append(f"at the bottom of its validation grid: {', '.join(bottom)}; no merge beat the pretrained model "
                     "on validation")
    if other:
        parts.append(f"at an end of its validation grid: {', '.join(other)}; at the top a wider grid could do better, "
                     "at the bottom no merge beat the pretrained model")
    return "Chosen " + "; chosen ".join(parts) + "."


def long_table(rows: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy ``(method, task, accuracy)`` rows for plotting."""
    return pd.DataFrame([{"method": m, "task": t, "accuracy": a}
                         for m, r in rows.items() for t, a in r["per_task_accuracy"].items()])

