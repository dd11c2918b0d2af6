"""Chapter 03 (task singular vectors): the experiments the notebook runs and tables it shows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..analysis.responses import ResponseEvaluator
from ..analysis.statistics import (accuracy_difference_ci, bootstrap_ci, claim, directional_status, paired_normalized_ci,
                                  paired_table, spearman_ci)
from ..evaluation import absolute_accuracy, grid_end, merge_baselines, normalized_accuracy
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
from ..utils import StateDict, check_integer, nan_for_none, shows_progress


def compressed_accuracy(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                        split: str = "test", compressed: Mapping[str, CompressedTaskVector] | None = None,
                        experts: Mapping[str, StateDict] | None = None, progress: bool = False,
                        **compress_options) -> dict[str, object]:
    """TSV-C with the task known: each task's compressed task vector is added to ``theta_0`` and the
    model is evaluated on that task only.

    Args:
        benchmark: anything with ``evaluate(state, split, tasks) -> {task: accuracy}``; with ``experts``, a
            benchmark :class:`~mergelab.analysis.responses.ResponseEvaluator` can read example by example.
        pretrained: ``theta_0``.
        task_vectors: task name to task vector.
        split: evaluation split.
        compressed: task name to an already compressed task vector (then ``compress_options`` is unused).
        experts: task name to the expert's weights: also compare each task's compressed model with its
            expert example by example (``paired_with_experts``, for a paired interval of the normalized
            accuracy, :func:`mergelab.analysis.statistics.paired_normalized_ci`).
        progress: a bar over the tasks (each decomposed, rebuilt and evaluated on its test set).
        compress_options: passed to :func:`tsv_compress` (``num_tasks``, ``rank_fraction`` or ``k``).

    Returns:
        ``{"per_task_accuracy", "compressed_bytes", "dense_bytes"}`` (bytes summed over tasks), and with
        ``experts`` ``"paired_with_experts"``: task to :func:`~mergelab.analysis.statistics.paired_table`
        (``a``: the compressed model, ``b``: the expert) on ``split``.
    """
    missing = sorted(set(task_vectors) - set(experts)) if experts is not None else []
    if missing:
        raise ValueError(f"experts lacks the tasks {missing}; give the expert of every task in task_vectors "
                         f"({', '.join(task_vectors)}).")
    per_task, compressed_bytes, dense, paired = {}, 0, 0, {}
    for task, tv in tqdm(task_vectors.items(), total=len(task_vectors), desc="TSV-C, task known", disable=not progress):
        c = compressed[task] if compressed is not None else tsv_compress(tv, **compress_options)
        compressed_bytes += c.nbytes()
        dense += storage_bytes(tv)
        state = tsv_reconstruct(c).apply_to(pretrained)
        per_task[task] = benchmark.evaluate(state, split=split, tasks=[task])[task]
        if experts is not None:
            responses = ResponseEvaluator(benchmark, tasks=[task], split=split)
            paired[task] = paired_table(responses.full(state), responses.full(experts[task]))
    out = {"per_task_accuracy": per_task, "compressed_bytes": compressed_bytes, "dense_bytes": dense}
    return {**out, "paired_with_experts": paired} if experts is not None else out


def compression_sweep(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                      expert_accuracy: Mapping[str, float], rank_fractions: Sequence[float],
                      split: str = "test", svd: str = "gram", progress: bool = False) -> pd.DataFrame:
    """TSV-C accuracy (task known) and storage for each kept fraction of ``min(m, n)``.

    Each task vector is decomposed once, at the largest fraction, and truncated for the others
    (:meth:`CompressedTaskVector.truncated`). One row per fraction: ``rank_fraction,
    storage_fraction`` (compressed / dense bytes), ``compression_ratio`` (dense / compressed),
    ``absolute_accuracy``, ``normalized_accuracy`` (mean over tasks of accuracy / expert accuracy).
    ``progress``: a bar over the fractions (each evaluates every task's compressed model).
    """
    if len(rank_fractions) == 0:
        return pd.DataFrame(columns=["rank_fraction", "storage_fraction", "compression_ratio",
                                     "absolute_accuracy", "normalized_accuracy"])
    widest = {t: tsv_compress(tv, rank_fraction=float(max(rank_fractions)), svd=svd)
              for t, tv in task_vectors.items()}
    rows = []
    for f in tqdm(rank_fractions, desc="TSV-C, kept fractions", disable=not progress):
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
                            split: str = "test", progress: bool | None = None, **options) -> pd.DataFrame:
    """Merge every pair of tasks with ``method`` and evaluate on those two tasks (a progress bar over the pairs
    when ``progress``; ``None``: the benchmark's setting).

    One row per unordered pair: ``task_a, task_b, accuracy_a, accuracy_b, normalized_accuracy``
    (mean of the two accuracy / expert ratios) and ``normalized_loss = 1 - normalized_accuracy``.
    """
    rows = []
    pairs = list(itertools.combinations(list(task_vectors), 2))
    show = shows_progress(benchmark, progress)
    for a, b in tqdm(pairs, desc="pairwise merges", disable=not show):
        state = merge(method, pretrained, [task_vectors[a], task_vectors[b]], **options)
        acc = benchmark.evaluate(state, split=split, tasks=[a, b])
        norm = normalized_accuracy(acc, expert_accuracy)
        rows.append({"task_a": a, "task_b": b, "accuracy_a": acc[a], "accuracy_b": acc[b],
                     "normalized_accuracy": norm, "normalized_loss": 1 - norm})
    return pd.DataFrame(rows)


def task_count_study(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                     expert_accuracy: Mapping[str, float], methods: Mapping[str, Mapping[str, object]],
                     task_counts: Sequence[int], subsets: int = 1, seed: int = 0,
                     expert_val: Mapping[str, float] | None = None, progress: bool | None = None) -> pd.DataFrame:
    """Accuracy of merging ``n`` tasks, for each ``n`` in ``task_counts`` and each method variant (a progress bar
    over the merges when ``progress``; ``None``: the benchmark's setting).

    Args:
        methods: a label per variant to its options: ``"method"`` (the registered name; default the
            label), ``"grid"`` (the coefficient is chosen on the validation split of the merged tasks,
            :func:`mergelab.evaluation.merge_baselines`; without it the method merges once with the
            other options, e.g. its data-free ``coefficient``). Compare like with like: each method
            validated, and each at its data-free default.
        task_counts: numbers of tasks, each in ``1..len(task_vectors)``.
        subsets: random subsets of tasks drawn (seeded) per count (one when ``n`` is all tasks).
        expert_val: the experts' validation accuracy, for choosing coefficients by normalized accuracy
            (needed when a method has a ``"grid"``).

    Returns:
        One row per (count, subset, variant): ``num_tasks, tasks, method`` (the label),
        ``coefficient, absolute_accuracy, normalized_accuracy, per_task_accuracy`` (test split), and for a
        coefficient chosen on a grid of two or more values ``at_grid_edge`` and the grid, ``validation_sweep``
        (``None`` otherwise; :func:`task_count_edge_note` reads them).
    """
    names = list(task_vectors)
    bad = [n for n in task_counts if not 1 <= int(n) <= len(names)]
    if bad:
        raise ValueError(f"task_counts contains {bad[0]!r}; use numbers of tasks in 1..{len(names)}.")
    check_integer("subsets", subsets)
    rng = np.random.default_rng(seed)
    rows = []
    show = shows_progress(benchmark, progress)
    bar = tqdm(total=sum(1 if n == len(names) else subsets for n in task_counts) * len(methods),
               desc="task-count merges", disable=not show)
    for n in task_counts:
        draws = 1 if n == len(names) else subsets
        for _ in range(draws):
            chosen = [names[i] for i in sorted(rng.choice(len(names), size=int(n), replace=False))]
            for label, spec in methods.items():
                opts = {k: v for k, v in spec.items() if k != "method"}
                method = str(spec.get("method", label))
                result = merge_baselines(benchmark, pretrained, {t: task_vectors[t] for t in chosen}, [method],
                                         options={method: {"grid": (), **opts}}, progress=False,
                                         expert_val=expert_val,
                                         metric="normalized" if expert_val is not None else "absolute")[method]
                acc = benchmark.evaluate(result.state, split="test", tasks=chosen)
                coefficient = result.coefficient if result.sweep else opts.get("coefficient")
                graded = len(result.sweep) >= 2  # chosen on a grid
                rows.append({"num_tasks": int(n), "tasks": ",".join(chosen), "method": label,
                             "coefficient": coefficient, "at_grid_edge": result.at_grid_edge if graded else None,
                             "validation_sweep": [float(c) for c in result.sweep] if graded else None,
                             "absolute_accuracy": absolute_accuracy(acc),
                             "normalized_accuracy": normalized_accuracy(acc, expert_accuracy),
                             "per_task_accuracy": dict(acc)})
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def test_sizes(benchmark, tasks: Sequence[str], split: str = "test") -> dict[str, int]:
    """Examples per task in ``split`` (for the sampling error of accuracies)."""
    return {t: int(len(benchmark.split(t, split)[1])) for t in tasks}


def compare_with_reference(task_vectors: Sequence[TaskVector], **options) -> dict[str, float]:
    """Time :func:`tsv_merge_matrices` against :func:`tsv_merge_matrix_reference` on every
    decomposed layer of real task vectors; ``{"reference_s", "fast_s", "speedup",
    "relative_difference"}`` (Frobenius norm over all layers). ``perf/bench_tsv.py`` does the
    same at ViT-B-32 size."""
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty; pass the task vectors to merge (two or more).")
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


def claims(energy: pd.DataFrame, rows: Mapping[str, Mapping[str, Any]], pairs: pd.DataFrame, study: pd.DataFrame,
           speed: Mapping[str, float], n_test: Mapping[str, int], size: str, seed: int = 0) -> list[dict[str, Any]]:
    """The chapter's claims about TSV, each ``{claim, source, status, evidence}`` with its interval.

    Args:
        energy: :func:`mergelab.analysis.spectra.energy_table` (one row per task and matrix).
        rows: the results rows per method (``per_task_accuracy``, test split): ``experts``,
            ``task_arithmetic``, ``tsv_merge`` (alpha = 1), ``tsv_merge_validated``, ``tsv_compress``.
        pairs: one row per pair of tasks with ``sti`` and ``normalized_loss`` (task arithmetic).
        study: :func:`task_count_study` with the variants ``tsv_merge_validated`` and
            ``task_arithmetic_validated``.
        speed: :func:`compare_with_reference`.
        n_test: test examples per task (:func:`test_sizes`).
        seed: seeds the bootstrap resamples of the energy and interference intervals (the chapter's ``seed``, so
            that its text and its claims read one interval).
        size: the benchmark size, recorded in the evidence.

    Accuracy comparisons use the binomial sampling error of the test sets only
    (:func:`mergelab.analysis.statistics.accuracy_difference_ci`); TSV-C's against the experts, the same
    images read by both, the paired interval of its normalized accuracy (``rows["tsv_compress"]
    ["paired_with_experts"]``, :func:`mergelab.analysis.statistics.paired_normalized_ci`). Chapter 00
    measures the variation between seeds, which this single run cannot.
    """
    out = []

    def add(text: str, source: str, status: str, evidence: Mapping[str, Any]) -> None:
        out.append(claim(text, source, status, {**evidence, "size": size}))

    gap = (energy["energy"] - energy["random_energy"]).to_numpy(float)
    ci = bootstrap_ci(np.mean, gap, seed=seed)
    add("Task matrices are low-rank: the top 1/T singular triplets hold far more of their energy (here: at least "
        "10 points more) than those of a random matrix of the same shape and norm.", "gargiulo2025tsv",
        directional_status(ci, margin=0.10), {"mean_energy_minus_random": ci,
                                              "mean_energy": float(energy["energy"].mean()),
                                              "mean_random_energy": float(energy["random_energy"].mean())})

    def per_task(method: str) -> dict[str, float]:
        return dict(rows[method]["per_task_accuracy"])

    if "tsv_compress" in rows:
        tables = rows["tsv_compress"].get("paired_with_experts")
        if not tables:
            raise ValueError("rows['tsv_compress'] lacks 'paired_with_experts' (compressed_accuracy(..., experts=...)): "
                             "the TSV-C claim is judged on the paired interval of its normalized accuracy.")
        ci = paired_normalized_ci(tables)
        minus = {**ci, **{k: ci[k] - 0.97 for k in ("estimate", "ci_low", "ci_high")}}
        add("TSV-C (top 1/T triplets, task known) keeps at least 97 % of the experts' accuracy (paper: about 99 %).",
            "gargiulo2025tsv", directional_status(minus),
            {"normalized": ci, "normalized_minus_0.97": minus})
    ci = spearman_ci(pairs["sti"], pairs["normalized_loss"], seed=seed)
    add("Pairs of tasks with more Singular Task Interference lose more accuracy when task arithmetic adds them "
        "(positive rank correlation; the pairs share tasks, so the bootstrap over pairs is approximate).",
        "gargiulo2025tsv", directional_status(ci), {"spearman": ci})
    for variant, text in (("tsv_merge_validated", "TSV-M with alpha chosen on validation"),
                          ("tsv_merge", "TSV-M at the data-free alpha = 1")):
        ci = accuracy_difference_ci(per_task(variant), per_task("task_arithmetic"), dict(n_test))
        add(f"{text} beats task arithmetic (validated) on all tasks together (public ViT-B-32: 85.9 against 70.8).",
            "gargiulo2025tsv", directional_status(ci), {"difference": ci})
    counts = sorted(n for n in set(study["num_tasks"]) if n >= 3)
    diffs, subsets = {}, {}
    for n in counts:
        part = study[study["num_tasks"] == n]
        a = part[part["method"] == "tsv_merge_validated"]["per_task_accuracy"]
        b = part[part["method"] == "task_arithmetic_validated"]["per_task_accuracy"]
        if len(a) and len(b):
            sub = [accuracy_difference_ci(x, y, {t: n_test[t] for t in x}) for x, y in zip(a, b)]
            subsets[int(n)] = len(sub)
            diffs[int(n)] = {"estimate": float(np.mean([d["estimate"] for d in sub])),
                             "ci_low": float(min(d["ci_low"] for d in sub)),
                             "ci_high": float(max(d["ci_high"] for d in sub))}
    statuses = [directional_status(d) for d in diffs.values()]
    status = ("not_testable" if not statuses else "reproduced" if all(s == "reproduced" for s in statuses)
              else "not_reproduced" if any(s == "not_reproduced" for s in statuses) else "not_testable")
    add("As more tasks are merged (3 or more), TSV-M keeps an edge over task arithmetic, both validated "
        "on each subset: on every subset drawn (test-set intervals; which tasks were drawn is not in them).",
        "gargiulo2025tsv", status, {"difference_by_num_tasks": diffs, "subsets_per_size": subsets})
    ok = bool(speed["relative_difference"] < 1e-4)
    add("The package's fast TSV-M computes what the plain per-task algorithm of the official code computes "
        "(relative difference below 1e-4 on these experts).", "gargiulo2025tsv",
        "reproduced" if ok else "not_reproduced", {"relative_difference": float(speed["relative_difference"]),
                                                    "speedup": float(speed["speedup"])})
    return out


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (the energy table, the methods' rows,
    the interference pairs, the task-count study, the speed check and the test sizes): equal to the
    ``claims`` stored there when they follow from its numbers (:func:`mergelab.report.claims.check_claims`)."""
    r = nan_for_none(results)  # strict JSON: a measured NaN was written as null
    return claims(pd.DataFrame(r["energy_table"]), r["methods"], pd.DataFrame(r["interference"]["pairs"]),
                  pd.DataFrame(r["task_count"]), r["speed"], results["test_sizes"], results["benchmark"],
                  seed=int(results.get("provenance", {}).get("seed", 0)))


def task_count_edge_note(study: pd.DataFrame) -> str:
    """A sentence on the task-count study's validated coefficients (:func:`task_count_study`'s rows): per variant
    chosen on a grid, how many of its merges took an end of the grid, at the top (the optimum may lie beyond it) or at
    the bottom (0 in the package's grids: no merge beat the pretrained model on validation); that every one lies
    inside its grid when none did; empty when no variant was chosen on a grid."""
    graded = study[study["at_grid_edge"].notna()] if "at_grid_edge" in study else study.iloc[0:0]
    if graded.empty:
        return ""
    parts = []
    for method, rows in graded.groupby("method", sort=False):
        edge = rows[rows["at_grid_edge"].astype(bool)]
        if edge.empty:
            continue
        by_end: dict[str, list[float]] = {}
        for c, grid in zip(edge["coefficient"], edge["validation_sweep"]):
            by_end.setdefault(grid_end(c, grid), []).append(float(c))
        where = [f"{len(by_end[e])} at the {e}, {by_end[e][0]:g}" for e in ("top", "bottom") if e in by_end]
        parts.append(f"{method} in {len(edge)} of {len(rows)} merges ({'; '.join(where)})")
    if not parts:
        return "In the task-count study every coefficient chosen on validation lies inside its grid."
    return ("In the task-count study some coefficients chosen on validation lie at an end of their grid (at the top "
            "the best may lie beyond it; at the bottom no merge beat the pretrained model): " + ", ".join(parts) + ".")


def task_count_note(curve: pd.DataFrame, task_subsets: int) -> str:
    """What the task-count figure's curves (``curve``: rows the numbers of tasks merged, ascending; one column per
    method) say about monotonicity, and how far its draws of tasks let one read a single step: whether every curve
    falls as tasks are added, or which rise again and where."""
    rises = {m: [int(n) for n, step in curve[m].diff().iloc[1:].items() if step > 0] for m in curve.columns}
    rises = {m: v for m, v in rises.items() if v}
    shape = ("Every curve falls with each task added. " if not rises else
             "The curves are not monotone: normalized accuracy rises again as tasks are added for "
             + "; ".join(f"{m} (at n = {', '.join(map(str, v))})" for m, v in rises.items()) + ". ")
    if task_subsets == 1:
        return shape + ("Each size is one random subset of tasks (`task_subsets` = 1), so its value also says which "
                        "tasks were drawn (an easy task lifts it): read the curves' trend and the order of the methods "
                        "at each size, not a single step; more subsets per size average the draw out, at a "
                        "proportional cost.")
    return shape + (f"Each size is the mean over {task_subsets} random subsets of tasks; the results JSON keeps each "
                    "subset (`task_count`), whose spread at a size says how much of a step the tasks drawn can explain.")
