"""Chapter 03 (task singular vectors): the experiments the notebook runs and tables it shows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..evaluation import absolute_accuracy, merge_baselines, normalized_accuracy
from ..layers import is_decomposed
from ..merging import merge
from ..merging.tsv import (
    CompressedTaskVector,
    storage_bytes,
    tsv_compress,
    tsv_merge_matrices,
    tsv_merge_matrix_reference,
    tsv_reconstruct,
)
from ..task_vectors import TaskVector
from ..utils import StateDict


def compressed_accuracy(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                        split: str = "test", compressed: Mapping[str, CompressedTaskVector] | None = None,
                        **compress_options) -> dict[str, object]:
    """TSV-C with the task known: each task's compressed task vector is added to ``theta_0`` and the
    model is evaluated on that task only.

    Args:
        benchmark: anything with ``evaluate(state, split, tasks) -> {task: accuracy}``.
        pretrained: ``theta_0``.
        task_vectors: task name to task vector.
        split: evaluation split.
        compressed: task name to an already compressed task vector (then ``compress_options`` is unused).
        compress_options: passed to :func:`tsv_compress` (``num_tasks``, ``rank_fraction`` or ``k``).

    Returns:
        ``{"per_task_accuracy", "compressed_bytes", "dense_bytes"}`` (bytes summed over tasks).
    """
    per_task, compressed_bytes, dense = {}, 0, 0
    for task, tv in task_vectors.items():
        c = compressed[task] if compressed is not None else tsv_compress(tv, **compress_options)
        compressed_bytes += c.nbytes()
        dense += storage_bytes(tv)
        state = tsv_reconstruct(c).apply_to(pretrained)
        per_task[task] = benchmark.evaluate(state, split=split, tasks=[task])[task]
    return {"per_task_accuracy": per_task, "compressed_bytes": compressed_bytes, "dense_bytes": dense}


def compression_sweep(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                      expert_accuracy: Mapping[str, float], rank_fractions: Sequence[float],
                      split: str = "test", svd: str = "gram") -> pd.DataFrame:
    """TSV-C accuracy (task known) and storage for each kept fraction of ``min(m, n)``.

    Each task vector is decomposed once, at the largest fraction, and truncated for the others
    (:meth:`CompressedTaskVector.truncated`). One row per fraction: ``rank_fraction,
    storage_fraction`` (compressed / dense bytes), ``compression_ratio`` (dense / compressed),
    ``absolute_accuracy``, ``normalized_accuracy`` (mean over tasks of accuracy / expert accuracy).
    """
    if len(rank_fractions) == 0:
        return pd.DataFrame(columns=["rank_fraction", "storage_fraction", "compression_ratio",
                                     "absolute_accuracy", "normalized_accuracy"])
    widest = {t: tsv_compress(tv, rank_fraction=float(max(rank_fractions)), svd=svd)
              for t, tv in task_vectors.items()}
    rows = []
    for f in rank_fractions:
        kept = {t: c.truncated(rank_fraction=float(f)) for t, c in widest.items()}
        r = compressed_accuracy(benchmark, pretrained, task_vectors, split, compressed=kept)
        acc = r["per_task_accuracy"]
        rows.append({"rank_fraction": float(f), "storage_fraction": r["compressed_bytes"] / r["dense_bytes"],
                     "compression_ratio": r["dense_bytes"] / r["compressed_bytes"],
                     "absolute_accuracy": absolute_accuracy(acc),
                     "normalized_accuracy": normalized_accuracy(acc, expert_accuracy)})
    return pd.DataFrame(rows)


def pairwise_merge_accuracy(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                            expert_accuracy: Mapping[str, float], method: str = "task_arithmetic",
                            split: str = "test", **options) -> pd.DataFrame:
    """Merge every pair of tasks with ``method`` and evaluate on those two tasks.

    One row per unordered pair: ``task_a, task_b, accuracy_a, accuracy_b, normalized_accuracy``
    (mean of the two accuracy / expert ratios) and ``normalized_loss = 1 - normalized_accuracy``.
    """
    rows = []
    for a, b in itertools.combinations(list(task_vectors), 2):
        state = merge(method, pretrained, [task_vectors[a], task_vectors[b]], **options)
        acc = benchmark.evaluate(state, split=split, tasks=[a, b])
        norm = normalized_accuracy(acc, expert_accuracy)
        rows.append({"task_a": a, "task_b": b, "accuracy_a": acc[a], "accuracy_b": acc[b],
                     "normalized_accuracy": norm, "normalized_loss": 1 - norm})
    return pd.DataFrame(rows)


def task_count_study(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                     expert_accuracy: Mapping[str, float], methods: Mapping[str, Mapping[str, object]],
                     task_counts: Sequence[int], subsets: int = 1, seed: int = 0,
                     expert_val: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Accuracy of merging ``n`` tasks, for each ``n`` in ``task_counts`` and each method.

    Args:
        methods: registered method name to its options; a ``"grid"`` entry makes the coefficient
            be chosen on the validation split of the merged tasks
            (:func:`mergelab.evaluation.merge_baselines`), otherwise the method merges once.
        task_counts: numbers of tasks, each in ``1..len(task_vectors)``.
        subsets: random subsets of tasks drawn (seeded) per count (one when ``n`` is all tasks).
        expert_val: the experts' validation accuracy, for choosing coefficients by normalized accuracy
            (needed when a method has a ``"grid"``).

    Returns:
        One row per (count, subset, method): ``num_tasks, tasks, method, coefficient,
        absolute_accuracy, normalized_accuracy`` (test split).
    """
    names = list(task_vectors)
    bad = [n for n in task_counts if not 1 <= int(n) <= len(names)]
    if bad:
        raise ValueError(f"task_counts contains {bad[0]!r}; use numbers of tasks in 1..{len(names)}.")
    rng = np.random.default_rng(seed)
    options = {m: {"grid": (), **o} for m, o in methods.items()}  # no "grid": one merge with the options
    rows = []
    for n in task_counts:
        draws = 1 if n == len(names) else subsets
        for _ in range(draws):
            chosen = [names[i] for i in sorted(rng.choice(len(names), size=int(n), replace=False))]
            merged = merge_baselines(benchmark, pretrained, {t: task_vectors[t] for t in chosen}, list(methods),
                                     options=options, progress=False, expert_val=expert_val,
                                     metric="normalized" if expert_val is not None else "absolute")
            for method, result in merged.items():
                acc = benchmark.evaluate(result.state, split="test", tasks=chosen)
                coefficient = result.coefficient if result.sweep else methods[method].get("coefficient")
                rows.append({"num_tasks": int(n), "tasks": ",".join(chosen), "method": method,
                             "coefficient": coefficient, "absolute_accuracy": absolute_accuracy(acc),
                             "normalized_accuracy": normalized_accuracy(acc, expert_accuracy)})
    return pd.DataFrame(rows)


def compare_with_reference(task_vectors: Sequence[TaskVector], **options) -> dict[str, float]:
    """Time :func:`tsv_merge_matrices` against :func:`tsv_merge_matrix_reference` on every
    decomposed layer of real task vectors; ``{"reference_s", "fast_s", "speedup",
    "relative_difference"}`` (Frobenius norm over all layers). ``perf/bench_tsv.py`` does the
    same at ViT-B-32 size."""

    ref_s = fast_s = diff = total = 0.0
    for key, v in task_vectors[0].items():
        if not is_decomposed(key, v):
            continue
        stack = torch.stack([tv[key].float() for tv in task_vectors])
        start = time.perf_counter()
        ref = tsv_merge_matrix_reference(list(stack))
        ref_s += time.perf_counter() - start
        start = time.perf_counter()
        fast = tsv_merge_matrices(stack, **options)
        fast_s += time.perf_counter() - start
        diff += float((fast.double() - ref.double()).pow(2).sum())
        total += float(ref.double().pow(2).sum())
    return {"reference_s": ref_s, "fast_s": fast_s, "speedup": ref_s / fast_s if fast_s else float("nan"),
            "relative_difference": (diff / total) ** 0.5 if total else 0.0}
