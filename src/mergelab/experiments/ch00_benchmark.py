"""Chapter 00 (the benchmark and the baselines): the diagnostics tables, the study over fine-tuning
seeds, and the chapter's claims with their evidence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..analysis.statistics import both, sample_sd, seed_status
from ..analysis.diagnostics import (cross_task_matrix, gain_fraction, linear_probe_fits, margin_linearity,
                                    off_diagonal_summary, own_task_curve, relative_norms, zero_shot_calibration)
from ..executors import LocalExecutor, benchmark_context
from ..evaluation import expert_accuracy, merge_baselines, merge_row, summarize
from ..merging import seeded_options
from ..task_vectors import TaskVector, task_vectors_from
from ..training import FinetuneConfig, recipe_fields
from ..utils import StateDict, nan_for_none
from .ch03_tsv import compressed_accuracy


def diagnostics(bench: Any, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                expert_test: Mapping[str, float], alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0),
                cross_coefficient: float = 0.3, progress: bool = False) -> dict[str, Any]:
    """What explains merging's success or failure on this benchmark (accuracies as fractions 0..1).

    Returns ``{"linear_probe": {task: acc}, "linear_probe_mean", "probe_over_experts"`` (mean probe /
    mean expert accuracy), ``"linear_probe_C": {task: C}`` (the probe's inverse L2 strength, chosen on
    validation), ``"linear_probe_at_grid_edge": [task, ...]`` (tasks whose C is at an end of its grid),
    ``"zero_shot_calibration": {task: {accuracy, cross_entropy, confidence,
    top_class_share}}`` (validation), ``"relative_norms": {task: {total, <layer kind>...}}``,
    ``"own_task_curve": {task: {alpha: acc}}`` (validation), ``"gain_at_0.3"``: per task the share of
    the expert's gain reached at alpha 0.3, ``"margin_linearity": {task: ...}`` (that curve against its
    per-example linearization and where the examples the expert gains cross the decision boundary,
    :func:`mergelab.analysis.diagnostics.margin_linearity`, validation), ``"cross_task": {"sources",
    "targets", "delta"}`` (the
    change of task t's validation accuracy when ``cross_coefficient`` times task s's vector is added)
    and ``"cross_task_off_diagonal": {mean, min}``}``. ``progress``: bars over the tasks of the curves and of
    the cross-task matrix (each task a few evaluations of validation splits).
    """
    fits = linear_probe_fits(bench, pretrained)
    probe = {t: f["accuracy"] for t, f in fits.items()}
    calibration = zero_shot_calibration(bench, pretrained, "val")
    curve = own_task_curve(bench, pretrained, task_vectors, alphas, progress=progress)
    margins = margin_linearity(bench, pretrained, task_vectors, alphas, curve=curve)
    sources, targets, delta = cross_task_matrix(bench, pretrained, task_vectors, cross_coefficient, "val",
                                                progress=progress)
    gains = {t: gain_fraction(c, 0.3) for t, c in curve.items()} if 0.3 in alphas else {}
    return {
        "linear_probe": probe,
        "linear_probe_mean": float(np.mean(list(probe.values()))),
        "probe_over_experts": float(np.mean(list(probe.values())) / np.mean([expert_test[t] for t in probe])),
        "linear_probe_C": {t: f["C"] for t, f in fits.items()},
        "linear_probe_at_grid_edge": [t for t, f in fits.items() if f["at_grid_edge"]],
        "zero_shot_calibration": calibration,
        "relative_norms": {t: relative_norms(pretrained, tv) for t, tv in task_vectors.items()},
        "own_task_curve": {t: {str(a): v for a, v in c.items()} for t, c in curve.items()},
        "gain_at_0.3": gains,
        "margin_linearity": margins,
        "cross_task": {"sources": sources, "targets": targets, "coefficient": cross_coefficient,
                       "delta": delta.tolist()},
        "cross_task_off_diagonal": off_diagonal_summary(sources, targets, delta),
    }


def value_span(values: Sequence[float], fmt: str) -> str:
    """``"lo to hi"`` of ``values`` formatted with ``fmt`` (e.g. ``".2f"``), or one value where both read alike."""
    lo, hi = min(values), max(values)
    return format(lo, fmt) if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} to {hi:{fmt}}"


def margin_paragraph(linearity: Mapping[str, Mapping[str, Any]], gain_at_03: Mapping[str, float],
                     bent_above: float = 0.10, early_by: float = 0.3) -> str:
    """The chapter's sentences on :func:`~mergelab.analysis.diagnostics.margin_linearity` (``linearity``)
    and the own-task curves' share of each expert's gain at alpha = 0.3 (``gain_at_03``; NaN where an
    expert gains nothing): which tasks' networks are close to linear along their own vector (the
    measured curve within ``bent_above`` of its linearization), where the gained examples turn right
    (median alpha* by ``early_by`` or later), and how much of the gains the curves keep at 0.3."""
    gap = max(r["max_gap"] for r in linearity.values())
    medians = {t: r["crossing_median"] for t, r in linearity.items() if r["gained"] > 0}
    early = [t for t, m in medians.items() if m <= early_by]
    late = {t: m for t, m in medians.items() if m > early_by}
    gains = {t: g for t, g in gain_at_03.items() if g == g}  # nan where an expert gains nothing
    bent = {t: r for t, r in linearity.items() if r["max_gap"] > bent_above}
    if not bent:
        text = (f"Along its own vector every task's network is close to linear on this run: the measured curve stays "
                f"within {100 * gap:.0f} accuracy points of its linearization. ")
    else:
        straight = ", ".join(t for t in linearity if t not in bent) or "no task"
        departures = ", ".join(f"{t} (up to {100 * r['max_gap']:.0f} points "
                               f"{'above' if r['largest_gap'] > 0 else 'below'} it)" for t, r in bent.items())
        text = (f"Along its own vector the network is close to linear for {straight} on this run (the measured curve "
                f"within {100 * bent_above:.0f} accuracy points of its linearization) but not for {departures}. ")
    if medians:
        text += (f"In the linearization, half of the examples an expert gains have turned right by alpha = {early_by:g} "
                 f"on {', '.join(early) if early else 'no task'}"
                 + (f"; on {', '.join(late)} their median lies at {value_span(list(late.values()), '.2f')}" if late else "")
                 + ". ")
    else:
        text += "No expert gains an example on this run's validation split. "
    if gains:
        text += (f"Measured, the curves keep {value_span(list(gains.values()), '.0%')} of the experts' gains over "
                 "zero-shot at alpha = 0.3" + (f" (least: {min(gains, key=gains.get)})" if len(gains) > 1 else "") + ".")
    return text


def _train_job(bench: Any, job: tuple[str, tuple[str, ...], FinetuneConfig]) -> str:
    """One fine-tuning run of :func:`train_experts` in a worker: ``(kind, tasks, recipe)``, cached by the
    benchmark exactly as :meth:`bench.expert` or :meth:`bench.multitask` caches it here."""
    kind, tasks, cfg = job
    if kind == "multitask":
        bench.multitask(cfg, tasks)
    else:
        bench.expert(tasks[0], cfg)
    return kind


def _describe_train_job(job: tuple[str, tuple[str, ...], FinetuneConfig]) -> dict[str, Any]:
    kind, tasks, cfg = job
    return {"kind": kind, "tasks": list(tasks), **recipe_fields(cfg)}


def train_experts(bench: Any, recipe: FinetuneConfig, seeds: Sequence[int], tasks: Sequence[str] | None = None,
                  workers: int = 1, progress: bool = True, multitask: FinetuneConfig | None = None) -> int:
    """Make sure the expert of every task exists for ``recipe`` at each fine-tuning seed (cached), and
    the multi-task model of ``multitask`` (its recipe; ``None``: none) on the same tasks.

    With ``workers > 1`` the runs train side by side in that many single-threaded processes
    (:class:`mergelab.executors.LocalExecutor`), each the very run :meth:`bench.expert` or
    :meth:`bench.multitask` trains here (same key, same bits where the size trains on fixed threads, as
    the tiny one does). The multi-task model, the longest run, starts first, so that no core waits for it
    at the end. That needs a size that trains every task with ``recipe`` itself and imports no experts.
    With ``workers == 1`` they train here, one after another, each expert with the size's recipe for its
    task (:meth:`bench.expert_recipe`); imported experts are taken as they are. Whatever ``workers``, the
    runs the size ships (:meth:`bench.shipped_run`: the tiny size's defaults) are copied into the cache
    here, not trained. Returns the number of runs trained by this call (0: all cached, shipped or imported).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} is not valid; use a positive integer (1 trains in this process).")
    if len(seeds) == 0:
        raise ValueError("seeds is empty; give at least one fine-tuning seed.")
    tasks = list(tasks or bench.tasks)
    recipes = [replace(recipe, seed=int(s)) for s in dict.fromkeys(seeds)]
    imported = [t for t in tasks if bench._imported_log(t) is not None]
    joint = tuple(sorted(tasks))
    jobs: list[tuple[str, tuple[str, ...], FinetuneConfig]] = []
    if multitask is not None and not bench.run_artifact("multitask", joint, multitask).exists():
        jobs.append(("multitask", joint, multitask))
    jobs += [("expert", (t,), r) for r in recipes for t in tasks if t not in imported
             and not bench.run_artifact("expert", [t], bench.expert_recipe(t, r)).exists()]
    shipped = [(kind, job_tasks, cfg) for kind, job_tasks, cfg in jobs if bench.shipped_run(
        kind, job_tasks, cfg if kind == "multitask" else bench.expert_recipe(job_tasks[0], cfg)) is not None]
    for kind, job_tasks, cfg in shipped:  # copied into the cache here: nothing to train
        _train_job(bench, (kind, job_tasks, cfg))
    jobs = [job for job in jobs if job not in shipped]
    if workers == 1:
        for job in jobs:
            _train_job(bench, job)
        return len(jobs)
    converted = sorted({t for r in recipes for t in tasks if bench.expert_recipe(t, r) != r})
    if imported or converted:
        raise ValueError(f"workers={workers} trains every expert with the recipe as given, but this benchmark "
                         + (f"imports the experts of {', '.join(imported)}" if imported else
                            f"trains {', '.join(converted)} with a recipe of its own (expert_recipe)")
                         + "; use workers: 1, which trains each expert as the benchmark says.")
    if not jobs:
        return 0
    bench.pretrained_state()  # the shared caches, built once before any worker starts
    for t in tasks:
        bench.head_digest(t)
        bench.split(t, "train")
    with LocalExecutor(workers, threads=1) as executor:
        outcome = executor.map(_train_job, jobs, benchmark_context(bench, executor.device),
                               describe=_describe_train_job, progress=progress,
                               desc=f"fine-tuning {len(jobs)} runs, {workers} at a time")
    outcome.raise_failures("fine-tuning runs")
    return len(jobs)


def run_logs(bench: Any, recipe: FinetuneConfig, seeds: Sequence[int], tasks: Sequence[str] | None = None,
             multitask: FinetuneConfig | None = None) -> list[dict[str, Any]]:
    """The training logs of the runs :func:`train_experts` made (same arguments; call it after): the
    multi-task model's (when asked for), then every seed's experts; each the artifact's sidecar
    (``"shipped": True`` for a run shipped with mergelab) or an imported expert's record."""
    tasks = list(tasks or bench.tasks)
    logs = []
    if multitask is not None:
        logs.append(bench.run_artifact("multitask", tuple(sorted(tasks)), multitask).meta())
    return logs + [bench.expert_log(t, replace(recipe, seed=int(s))) for s in dict.fromkeys(seeds) for t in tasks]


SEED_STUDY_METHODS = ("weight_averaging", "task_arithmetic")
"""Baselines the seed study rebuilds per seed (with TSV-M and TSV-C): those the chapter's claims name."""


def seed_study(bench: Any, pretrained: StateDict, recipe: FinetuneConfig, seeds: Sequence[int],
               merge_methods: Sequence[str] = SEED_STUDY_METHODS, tsv_grid: Sequence[float] | None = None,
               cross_coefficient: float = 0.3, progress: bool = True) -> dict[str, Any]:
    """Every model of the chapter for each fine-tuning seed (test split; coefficients on validation).

    Per seed: experts trained with ``recipe`` at that seed, zero-shot, every method of
    ``merge_methods`` validated by normalized accuracy, TSV-M validated (``tsv_grid``) and at its
    data-free ``alpha = 1``, and TSV-C with the task known. Returns ``{"seeds": [...], "per_seed":
    {seed: {method: row}}, "summary": {method: {metric: {"mean", "sd", "min", "max"}}},
    "cross_coefficient", "cross_task_off_diagonal": {seed: {"mean", "min"}}}`` where a row is
    :func:`mergelab.evaluation.summarize` plus ``coefficient`` and ``at_grid_edge`` for merges; the
    spread is the standard deviation over seeds (ddof 1). ``cross_task_off_diagonal`` is, per seed, the
    mean and the smallest change of a task's validation accuracy when ``cross_coefficient`` times another
    task's vector is added (the off-diagonal of :func:`mergelab.analysis.diagnostics.cross_task_matrix`;
    the chapter's diagnostics computed it for one seed, whose evaluations the cache holds).
    """
    if len(seeds) == 0:
        raise ValueError("seeds is empty; give at least one fine-tuning seed.")
    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    interference: dict[str, dict[str, float]] = {}
    zero_shot_test = bench.evaluate(pretrained, "test")
    for seed in tqdm(list(seeds), desc="fine-tuning seeds", disable=not progress):
        experts = bench.experts(replace(recipe, seed=int(seed)))
        test = expert_accuracy(bench, experts, "test")
        val = expert_accuracy(bench, experts, "val")
        tvs = task_vectors_from(pretrained, experts)
        rows: dict[str, dict[str, Any]] = {"zero_shot": summarize(zero_shot_test, test),
                                           "experts": summarize(test, test)}
        options = {**seeded_options(merge_methods, seed),  # DARE's masks drawn with the fine-tuning seed
                   "tsv_merge": {"also_at": [1.0], **({"grid": list(tsv_grid)} if tsv_grid is not None else {})}}
        merged = merge_baselines(bench, pretrained, tvs, [*merge_methods, "tsv_merge"], options=options,
                                 progress=False, expert_val=val)
        for name, result in merged.items():
            key = "tsv_merge_validated" if name == "tsv_merge" else name
            rows[key] = {k: v for k, v in merge_row(bench, result, test).items() if k != "validation_sweep"}
        tsv = merged["tsv_merge"]
        alpha_one = tsv.also.get(1.0)
        if alpha_one is not None:
            rows["tsv_merge"] = merge_row(bench, tsv, test, state=alpha_one, coefficient=1.0)
        compressed = compressed_accuracy(bench, pretrained, tvs, "test", num_tasks=len(tvs))
        rows["tsv_compress"] = summarize(compressed["per_task_accuracy"], test)
        per_seed[str(seed)] = rows
        interference[str(seed)] = off_diagonal_summary(*cross_task_matrix(bench, pretrained, tvs, cross_coefficient,
                                                                          "val"))
    return {"seeds": [int(s) for s in seeds], "per_seed": per_seed, "summary": summarize_seeds(per_seed),
            "cross_coefficient": float(cross_coefficient), "cross_task_off_diagonal": interference}


def summarize_seeds(per_seed: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    metrics: Sequence[str] = ("absolute_accuracy", "normalized_accuracy")) -> dict[str, Any]:
    """``{method: {metric: {"mean", "sd", "min", "max", "n"}}}`` over seeds (``sd``: ddof 1, 0 for one seed)."""
    methods = list(next(iter(per_seed.values())))
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {}
        for metric in metrics:
            values = np.array([rows[m][metric] for rows in per_seed.values() if m in rows], dtype=float)
            out[m][metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                              "min": float(values.min()), "max": float(values.max()), "n": int(len(values))}
    return out


def claims(study: Mapping[str, Any], size: str) -> list[dict[str, Any]]:
    """The chapter's claims, each ``{claim, source, status, evidence}``, from a :func:`seed_study` (its
    merges and its cross-task matrices, one per seed).

    A comparison "A beats B by a margin" (or "A reaches a threshold") is judged on the per-seed values
    (A and B share each seed's experts, so a comparison is paired): ``reproduced`` when their mean is
    above the margin by more than twice their standard deviation over seeds, ``not_reproduced`` when it
    is below by more than that, and ``not_testable`` when the spread straddles the margin (this size's
    seeds cannot decide, as chapters 01-03 label an interval that contains the margin); with one seed
    there is no spread, and the value alone decides."""
    summary = study["summary"]
    # in seed order whatever the mapping's order (a results file's keys are strings): sums in one order
    per_seed = dict(sorted(study["per_seed"].items(), key=lambda kv: int(kv[0])))

    def m(method: str, metric: str = "absolute_accuracy") -> dict[str, float]:
        return summary[method][metric]

    def paired(a: str, b: str, margin: float = 0.0) -> tuple[str, dict[str, float]]:  # over the seeds holding both
        d = np.array([rows[a]["absolute_accuracy"] - rows[b]["absolute_accuracy"] for rows in per_seed.values()
                      if a in rows and b in rows])
        return seed_status(d, margin), {"mean_difference": float(d.mean()), "sd_difference": sample_sd(d),
                                        "margin": margin, "seeds": int(len(d))}

    out = []

    def add(claim: str, source: str, status: str | bool, evidence: dict[str, Any]) -> None:
        if isinstance(status, bool):
            status = "reproduced" if status else "not_reproduced"
        out.append({"claim": claim, "source": source, "status": status, "evidence": {**evidence, "size": size}})

    holds, diff = paired("task_arithmetic", "zero_shot", 0.10)
    add("Task arithmetic beats zero-shot by a wide margin (public ViT-B-32: +22 points; here at least +10).",
        "ilharco2023task", holds, {"task_arithmetic": m("task_arithmetic"), "zero_shot": m("zero_shot"), **diff})
    low, d1 = paired("weight_averaging", "zero_shot")
    high, d2 = paired("task_arithmetic", "weight_averaging")
    add("Weight averaging lies between zero-shot and task arithmetic.", "ilharco2023task", both(low, high),
        {"weight_averaging": m("weight_averaging"), "above_zero_shot": d1, "below_task_arithmetic": d2})
    if "tsv_merge_validated" in summary:
        holds, diff = paired("tsv_merge_validated", "task_arithmetic", 0.03)
        add("TSV-M beats task arithmetic (public ViT-B-32: 85.9 against 70.8; here by at least 3 points).",
            "gargiulo2025tsv", holds, {"tsv_merge_validated": m("tsv_merge_validated"),
                                       "task_arithmetic": m("task_arithmetic"), **diff})
    if "tsv_compress" in summary:
        tsvc = m("tsv_compress", "normalized_accuracy")
        values = np.array([rows["tsv_compress"]["normalized_accuracy"] for rows in per_seed.values()])
        add("TSV-C with the task known keeps at least 97 % of the experts' accuracy.", "gargiulo2025tsv",
            seed_status(values, 0.97), {"tsv_compress_normalized": tsvc, "threshold": 0.97})
    # per merge of every task, experts minus the merge on each seed: above 0 when the merge stays below
    below = {k: paired("experts", k) for k in summary if k not in ("experts", "tsv_compress", "zero_shot")}
    add("Every merge stays below the experts.", "ilharco2023task",
        both(*(st for st, _ in below.values())) if below else "not_testable",
        {**{k: summary[k]["absolute_accuracy"]["mean"] for k in summary},
         "experts_minus_merge": {k: d for k, (_, d) in below.items()}})
    # each seed's mean over the pairs of tasks of its cross-task matrix (validation), against the margin
    per = {s: study["cross_task_off_diagonal"][s] for s in per_seed}
    means = np.array([v["mean"] for v in per.values()], dtype=float)
    add(f"Fine-tuned task vectors are weight-disentangled: adding {study['cross_coefficient']:g} of another task's "
        "vector costs a task less than 3 points of accuracy on average.", "ortizjimenez2023tangent",
        seed_status(means, -0.03) if np.isfinite(means).all() else "not_testable",  # nan: no pair of tasks
        {"mean_off_diagonal_change": float(means.mean()), "sd_over_seeds": sample_sd(means), "margin": -0.03,
         "coefficient": study["cross_coefficient"], "seeds": len(means), "worst": min(v["min"] for v in per.values()),
         "per_seed": {s: v["mean"] for s, v in per.items()}})
    return out


def seed_table(summary: Mapping[str, Any], metric: str = "absolute_accuracy") -> Any:
    """The seed summary as a table: one row per model, ``mean``, ``sd``, ``min``, ``max`` of ``metric``."""
    import pandas as pd

    return pd.DataFrame({m: v[metric] for m, v in summary.items()}).T[["mean", "sd", "min", "max", "n"]]


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (its ``seeds`` and ``benchmark``): equal to
    the ``claims`` stored there when they follow from its numbers (:func:`mergelab.report.claims.check_claims`)."""
    r = nan_for_none(results)  # strict JSON: a measured NaN was written as null
    return claims(r["seeds"], results["benchmark"])


def check_norm_balanced(fn: Any) -> None:
    """The check of chapter 00's first exercise: ``fn(pretrained, task_vectors, coefficient)`` is the norm-balanced
    merge ``theta_0 + coefficient * sum_t (mean_norm / ||tau_t||) tau_t`` (a zero task vector adds nothing), on two
    task vectors of norms 1 and 3, each of which it must scale to the mean norm 2. (The contract of every merge rule,
    :func:`mergelab.merging.check_merge_rule`, is checked apart: it holds for plain task arithmetic too.) Raises
    ``AssertionError`` saying what differs."""
    import torch

    pre = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    small = TaskVector({"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.zeros(2)})  # norm 1
    large = TaskVector({"w": torch.zeros(2, 2), "b": torch.tensor([0.0, 3.0])})  # norm 3
    got = fn(pre, [small, large], coefficient=0.5)
    want = {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([0.0, 1.0])}  # 0.5 x 2 x each unit vector
    for k, v in want.items():
        diff = (got[k] - v).abs().max().item()
        assert diff < 1e-5, (
            f"task vectors of norms 1 and 3 must each be scaled to their mean norm 2 before the sum; at coefficient 0.5 "
            f"{k!r} should be {v.tolist()}, got {got[k].tolist()}"
            + (": that is plain task arithmetic (no rescaling)." if torch.allclose(got[k], 0.5 * (small[k] + large[k]))
               else "."))
    zero = TaskVector({k: torch.zeros_like(v) for k, v in pre.items()})
    with_zero = fn(pre, [small, zero], coefficient=1.0)  # mean norm 0.5: the small one is halved, the zero adds nothing
    assert torch.allclose(with_zero["w"], 0.5 * small["w"]) and torch.isfinite(with_zero["b"]).all(), (
        f"with a zero task vector beside one of norm 1 the mean norm is 0.5: expected 'w' = {(0.5 * small['w']).tolist()} "
        f"and nothing from the zero vector; got {with_zero['w'].tolist()}")


def merge_limit(decomposition: Mapping[str, Mapping[str, float]], expert_accuracy: Mapping[str, float]) -> str:
    """Which of the two limits of task arithmetic :func:`~mergelab.analysis.diagnostics.alone_and_merged`'s
    ``decomposition`` (per task ``alone``, ``others``, accuracies 0..1 on one split) finds, as the phrase chapter 00's
    summary ends with: the *reach* of each task's own vector at the merge's coefficient (the mean of ``expert - alone``
    over tasks, ``expert_accuracy`` on the same split) or the *interference* of the others (the mean of ``-others``),
    whichever is larger, with both figures in points."""
    reach = float(np.mean([expert_accuracy[t] - r["alone"] for t, r in decomposition.items()]))
    interference = float(np.mean([-r["others"] for r in decomposition.values()]))
    if reach > abs(interference):
        return ("how far each task's own vector reaches: at this coefficient a vector alone stays "
                f"{100 * reach:.1f} points below its expert on average, while the other vectors together "
                f"{'take' if interference > 0 else 'give'} {100 * abs(interference):.1f} points")
    return (f"what the other tasks' vectors do: together they take {100 * interference:.1f} points from a task on "
            f"average, more than the {100 * reach:.1f} by which a task's own vector alone stays below its expert")
