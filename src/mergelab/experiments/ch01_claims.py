"""Chapter 01 (the stability bound): the seed paper's directional predictions tested one
hyperparameter at a time with confidence intervals, the chapter's claims list, and its
recommendations (stated only where the intervals separate).

Each effect is a per-draw difference between two merges of the same tasks (a draw: a random subset of
tasks, fine-tuned with one of the grid's seeds). Draws are not independent: seeds cycle over the draws
(draw d uses ``seeds[d % len(seeds)]``), and two draws with one seed share the experts of the tasks they
have in common (at the `tiny` size any two subsets of 3 of its 5 pool tasks share one). The unit of
replication is therefore the fine-tuning seed: the draws of a seed are averaged, and the interval is
Student's t over seeds (:func:`mergelab.analysis.statistics.mean_ci` with ``groups``). It holds the sampling
noise of each merge's measurement and the variation between task subsets and seeds; with one seed there is
no interval, and the claims it would decide are not testable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.statistics import claim, directional_status, format_ci, mean_ci, spearman_ci
from ..utils import nan_for_none
from .ch01_stability import ExpertGrid

SOURCE = "li2026generalization"
"""Bibliography key of the seed paper (reports/references.bib)."""

PREDICTIONS = {
    # hyperparameter: (what "more" means, predicted sign of the change in gap when it grows)
    "lr": ("a larger learning rate", "positive"),
    "batch_size": ("a larger batch", "negative"),
    "num_steps": ("more steps past the centre", "positive"),
    "data_fraction": ("more data", "negative"),
}
"""The seed's directional predictions for the merged model's generalization gap; accuracy is
predicted to move the other way (worse generalization, lower test accuracy)."""

_OTHER = {"positive": "negative", "negative": "positive"}


def slice_differences(merges: Any, grid: ExpertGrid, hyperparameter: str, column: str) -> pd.DataFrame:
    """Per draw, ``column`` of the homogeneous simple-averaging merge at the hyperparameter's top level
    minus the one at its bottom level (for ``num_steps``: the last checkpoint minus the centre step
    count, "past a point"), the other hyperparameters at the centre.

    Returns:
        one row per draw: ``draw``, ``seed`` (its fine-tuning seed), ``low``, ``high`` (the two levels),
        ``value_low``, ``value_high``, ``difference``.
    """
    if hyperparameter not in grid.levels:
        raise ValueError(f"hyperparameter={hyperparameter!r} is not valid; the grid varies {', '.join(grid.levels)}.")
    avg = merges[(merges["method"] == "weight_averaging") & (merges["kind"] == "homogeneous")]
    part = avg[avg["varied"].isin(["centre", hyperparameter])]
    if hyperparameter != "num_steps":
        part = part[part["mean_num_steps"] == grid.centre("num_steps")]
    levels = sorted(grid.levels[hyperparameter])
    low = grid.centre("num_steps") if hyperparameter == "num_steps" else levels[0]
    high = levels[-1]
    rows = []
    for draw, d in part.groupby("draw"):
        at = d.set_index(f"mean_{hyperparameter}")[column]
        if low in at.index and high in at.index:
            rows.append({"draw": int(draw), "seed": int(d["seed"].iloc[0]), "low": low, "high": high,
                         "value_low": float(at.loc[low]), "value_high": float(at.loc[high]),
                         "difference": float(at.loc[high] - at.loc[low])})
    return pd.DataFrame(rows, columns=["draw", "seed", "low", "high", "value_low", "value_high", "difference"])


def sparsification_differences(merges: Any, grid: ExpertGrid, method: str, column: str) -> pd.DataFrame:
    """Per draw, the mean over the draw's centre and heterogeneous merges of ``column`` with ``method``
    (e.g. TIES) minus the same merge by simple averaging (the same experts).

    Returns:
        one row per draw: ``draw``, ``seed`` (its fine-tuning seed), ``pairs`` (merges compared),
        ``difference``.
    """
    base = merges[(merges["kind"] == "heterogeneous")
                  | ((merges["varied"] == "centre") & (merges["mean_num_steps"] == grid.centre("num_steps")))]
    key = ["draw", "kind", "varied"]
    avg = base[base["method"] == "weight_averaging"].set_index(key)[column]
    other = base[base["method"] == method].set_index(key)[column]
    if other.empty:
        raise ValueError(f"method={method!r} has no merges in the table; have: {', '.join(sorted(set(merges['method'])))}.")
    diff = (other - avg.reindex(other.index)).dropna().reset_index()
    out = diff.groupby("draw")[column].agg(["size", "mean"]).reset_index().rename(
        columns={"size": "pairs", "mean": "difference"})
    out.insert(1, "seed", out["draw"].map(base.groupby("draw")["seed"].first()).astype(int))
    return out


def _effect(table: pd.DataFrame) -> dict[str, Any]:
    """A :func:`mean_ci` over the fine-tuning seeds of the per-draw ``difference`` (the module's docstring says
    why), with the draws' rows in ``per_draw``."""
    return {**mean_ci(table["difference"], groups=table["seed"]), "per_draw": table.to_dict("records")}


def effects(merges: Any, grid: ExpertGrid, sparsify: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Every effect the claims test, each a :func:`mean_ci` over seeds (``n``; ``rows``: the draws) plus its
    ``per_draw`` rows.

    Keys ``"<hyperparameter>:<column>"`` for the gap (``gap_vs_pretrained``), ``test_accuracy`` and
    ``train_loss`` along each hyperparameter of the grid, and ``"<method>:<column>"`` for each
    sparsifying method against simple averaging (gap and accuracy).
    """
    out = {}
    for h in PREDICTIONS:
        if h in grid.levels:
            for col in ("gap_vs_pretrained", "test_accuracy", "train_loss"):
                out[f"{h}:{col}"] = _effect(slice_differences(merges, grid, h, col))
    for method in sparsify:
        for col in ("gap_vs_pretrained", "test_accuracy"):
            out[f"{method}:{col}"] = _effect(sparsification_differences(merges, grid, method, col))
    return out


def heterogeneity_effects(hetero: pd.DataFrame) -> dict[str, dict[str, dict[str, Any]]]:
    """Heterogeneous minus homogeneous merge at equal mean hyperparameters, per spread hyperparameter: the
    change in measured gap (nats) and in test accuracy, each a :func:`mean_ci` over the fine-tuning seeds of
    the per-draw differences, as the chapter's other effects.

    Args:
        hetero: :func:`mergelab.experiments.ch01_stability.heterogeneity_table` of one method.

    Returns:
        ``{hyperparameter: {"gap": interval, "test_accuracy": interval}}``.
    """
    columns = {"gap": ("gap_heterogeneous", "gap_homogeneous"),
               "test_accuracy": ("test_acc_heterogeneous", "test_acc_homogeneous")}
    return {str(h): {name: mean_ci(part[a] - part[b], groups=part["seed"]) for name, (a, b) in columns.items()}
            for h, part in hetero.groupby("hyperparameter", sort=False)}


def bound_validity(table: Any, bound: str, high: str = "gap_vs_pretrained_ci_high",
                   low: str = "gap_vs_pretrained_ci_low") -> dict[str, Any]:
    """Whether a bound lies above the measured gaps: ``reproduced`` when it is above every gap's
    interval, ``not_reproduced`` when it is below some gap's whole interval, else ``not_testable``."""
    b = table[bound].to_numpy(float)
    ok = np.isfinite(b)
    above = int((b[ok] >= table[high].to_numpy(float)[ok]).sum())
    below = int((b[ok] < table[low].to_numpy(float)[ok]).sum())
    status = "not_reproduced" if below else "reproduced" if above == ok.sum() and ok.any() else "not_testable"
    return {"status": status, "n": int(ok.sum()), "above_interval": above, "below_interval": below,
            "median_bound": float(np.median(b[ok])) if ok.any() else float("nan"),
            "max_gap_ci_high": float(np.nanmax(table[high].to_numpy(float))) if len(table) else float("nan")}


def claims(merges: Any, experts: Any, correlations: Mapping[str, Any], grid: ExpertGrid, size: str,
           sparsify: Sequence[str] = (), regime: str = "quadratic") -> list[dict[str, Any]]:
    """The chapter's claims, ``{claim, source, status, evidence}`` each, status from intervals.

    Args:
        merges: :func:`mergelab.experiments.ch01_stability.run_merges`' table.
        experts: :func:`mergelab.experiments.ch01_stability.expert_table` with a ``bound`` column (K = 1).
        correlations: :func:`mergelab.experiments.ch01_stability.rank_correlations` per regime.
        size: the benchmark size (recorded in every claim's evidence).
        sparsify: the sparsifying methods merged besides simple averaging.
    """
    eff = effects(merges, grid, sparsify)
    out = []

    def add(text: str, status: str, evidence: Mapping[str, Any]) -> None:
        out.append(claim(text, SOURCE, status, {**evidence, "size": size}))

    for h, (more, sign) in PREDICTIONS.items():
        if h not in grid.levels:
            continue
        gap, acc = eff[f"{h}:gap_vs_pretrained"], eff[f"{h}:test_accuracy"]
        worse = "worse" if sign == "positive" else "better"
        add(f"Merging experts trained with {more} gives a {worse} generalization gap (gap of the merged model, "
            "controlled for the pretrained model's).", directional_status(gap, sign),
            {"effect": "gap(high) - gap(low), nats, per draw", **gap})
        add(f"Merging experts trained with {more} gives {'lower' if sign == 'positive' else 'higher'} merged test "
            "accuracy.", directional_status(acc, _OTHER[sign]), {"effect": "accuracy(high) - accuracy(low)", **acc})
    if "lr" in grid.levels:
        opt = eff["lr:train_loss"]
        add("The optimization term grows with the experts' learning rate: the merged model's training loss rises "
            "(task vectors interfere; the other half of the seed's trade-off, behind merging collapse).",
            directional_status(opt, "positive"), {"effect": "train_loss(high lr) - train_loss(low lr), nats", **opt})
    for method in sparsify:
        gap, acc = eff[f"{method}:gap_vs_pretrained"], eff[f"{method}:test_accuracy"]
        add(f"Sparsifying before merging ({method}) tightens generalization: a smaller merged gap than simple "
            "averaging of the same experts.", directional_status(gap, "negative"),
            {"effect": f"gap({method}) - gap(averaging), nats", **gap,
             "accuracy_difference": {k: v for k, v in acc.items() if k != "per_draw"}})
    rq = correlations[regime]["overall"]
    within = {"estimate": rq["spearman_within_draw"], "ci_low": rq["within_draw_ci_low"],
              "ci_high": rq["within_draw_ci_high"]}
    add("The bound ranks merges by their measured gap (Spearman within draws, so that task subsets do not count).",
        directional_status(within, "positive"), {"regime": regime, "within_draw": within, "overall": rq})
    # a task's runs share its seed, data subset and evaluation examples: the tasks are the independent units
    k1 = spearman_ci(experts["bound"], experts["gap_vs_pretrained"], groups=experts["task"])
    add("For single experts (K = 1) the bound ranks them by their measured gap.", directional_status(k1, "positive"),
        {"regime": regime, **k1})
    avg = merges[merges["method"] == "weight_averaging"]
    for name, table, col in (("merges (simple averaging)", avg, f"bound_{regime}"), ("single experts (K = 1)", experts, "bound")):
        v = bound_validity(table, col)
        add(f"The bound holds for {name}: it lies above every measured gap's 95 % interval.", v.pop("status"),
            {"regime": regime, **v})
    return out


SETTLED = 1e-2
"""A curvature estimate counts as settled when its Ritz residual is at most this share of its size."""


def curvature_settled_markdown(rows: Sequence[Mapping[str, Any]], steps: int) -> str:
    """One paragraph on how far the Hessian extremes of :func:`mergelab.experiments.ch01_stability.estimate_curvature`
    had settled: per end, the Ritz residual relative to the estimate (median and largest), how many points exceed
    :data:`SETTLED`, and how many have a residual as large as the estimate itself (whose sign and order of
    magnitude the run leaves open). Ends with what that means for the bound's ``beta`` (from ``lambda_max``) and
    ``rho`` (from ``lambda_min``).

    Args:
        rows: one mapping per point with ``lambda_max``, ``lambda_min``, ``residual_max``, ``residual_min``.
        steps: the Lanczos steps each point ran (``curvature_iters``).
    """
    df = pd.DataFrame(list(rows))
    missing = [c for c in ("lambda_max", "lambda_min", "residual_max", "residual_min") if c not in df]
    if df.empty or missing:
        raise ValueError(f"rows must be a nonempty list of points with lambda_max, lambda_min, residual_max and "
                         f"residual_min; missing: {missing or 'every row'}.")
    parts, unsettled = [], {}
    names = {"max": ("\\lambda_{\\max}", "\\beta"), "min": ("\\lambda_{\\min}", "\\rho")}
    for end, (name, _) in names.items():
        size = df[f"lambda_{end}"].abs()
        rel = df[f"residual_{end}"] / size
        unsettled[end] = n = int((~(rel <= SETTLED)).sum())  # a zero estimate (rel NaN or inf) is not settled
        open_ = int((~(df[f"residual_{end}"] < size)).sum())
        state = (f"every one within {SETTLED:.0%} of an eigenvalue" if n == 0 else
                 f"{n} of the {len(df)} not within {SETTLED:.0%}"
                 + (f", {open_} with a residual as large as the estimate: sign and order of magnitude open" if open_ else ""))
        parts.append(f"${name}$ median {rel.median():.1e}, largest {rel.max():.1e} ({state})")
    none = [end for end in names if unsettled[end] == len(df)]
    if len(none) == 2:
        closing = "; with neither end settled, $\\beta$ and $\\rho$ are both uncertain here."
    elif none:
        name, const = names[none[0]]
        closing = f"; with no ${name}$ settled, ${const}$ is the least certain of its constants here."
    elif any(unsettled.values()):
        closing = "; the median over tasks keeps a few unsettled points from deciding either."
    else:
        closing = "."
    return (f"Each point's extremes come from {steps} Lanczos steps (one Hessian-vector product each; both ends from "
            "one Krylov space), with their Ritz residuals: some eigenvalue of the Hessian lies within the residual of "
            "the estimate, and the extremes can only be underestimated (Ritz values lie inside the spectrum). "
            "Residual over the estimate's size: " + "; ".join(parts) + ". The bound's $\\beta$ comes "
            "from $\\lambda_{\\max}$ and its $\\rho$ from $\\lambda_{\\min}$" + closing)


def recommendations_markdown(eff: Mapping[str, Mapping[str, Any]], correlations: Mapping[str, Any],
                             regime: str = "quadratic") -> str:
    """The chapter's recommendations, one Markdown bullet per hyperparameter and per sparsifying
    method: a recommendation only where the 95 % interval of the merged accuracy's change (or, failing
    that, of the gap's) excludes zero; otherwise the bullet says this size supports none.

    Args:
        eff: :func:`effects`.
    """
    lines, supported = [], 0
    names = {"lr": "learning rate", "batch_size": "batch size", "num_steps": "steps", "data_fraction": "data fraction"}
    for key in [k for k in eff if k.endswith(":test_accuracy")]:
        what = key.split(":")[0]
        acc, gap = eff[key], eff[f"{what}:gap_vs_pretrained"]
        rows = acc["per_draw"]
        label = (f"**{names[what]}** ({rows[0]['low']:g} → {rows[0]['high']:g})" if what in names and rows
                 else f"**{what}** (against simple averaging)")
        text = (f"{label}: merged accuracy {format_ci(acc, 100, ' points')}, gap {format_ci(gap, 1, ' nats')}")
        # what the effect moves towards ("up": the higher level, or the method) and away from ("down")
        setting = what in names
        up, down = ("the higher setting", "the lower setting") if setting else (what, "simple averaging")
        if np.isfinite(acc["ci_low"]) and (acc["ci_low"] > 0 or acc["ci_high"] < 0):
            supported += 1
            better, worse = (up, down) if acc["ci_low"] > 0 else (down, up)
            lines.append(f"* {text}: prefer {better}{'' if setting else ' over ' + worse}.")
        elif np.isfinite(gap["ci_low"]) and (gap["ci_low"] > 0 or gap["ci_high"] < 0):
            supported += 1
            larger = gap["ci_low"] > 0
            where = "at the higher setting" if setting else "than with simple averaging"
            lines.append(f"* {text}: the gap separates ({'larger' if larger else 'smaller'} {where}) but accuracy "
                         f"does not; a weak preference for {down if larger else up} (the smaller gap) only.")
        elif not (np.isfinite(acc["ci_low"]) and np.isfinite(gap["ci_low"])):
            lines.append(f"* {text}: no interval (fewer than two fine-tuning seeds), so this size supports no "
                         "recommendation.")
        else:
            lines.append(f"* {text}: both intervals include zero, so this size supports no recommendation.")
    rq = correlations[regime]["overall"]
    lo, hi = rq["within_draw_ci_low"], rq["within_draw_ci_high"]
    per = {h: c for h, c in correlations[regime].items() if h != "overall" and "within_draw_ci_low" in c}
    ranks = [names.get(h, h) for h, c in per.items() if c["within_draw_ci_low"] > 0]  # NaN: not above 0
    blind = [names.get(h, h) for h, c in per.items() if not c["within_draw_ci_low"] > 0]
    trust = "it orders merges like the measured gap over all recipes together"
    if not (np.isfinite(lo) and lo > 0):
        trust = "its ordering of merges is not supported here; do not use it to choose recipes"
    elif per and not blind:
        trust += "; along each hyperparameter as well"
    elif blind:
        along = f"along {', '.join(ranks)} too, but not" if ranks else "but along no single hyperparameter, not"
        trust += (f"; {along} along {', '.join(blind)} (the interval within draws includes 0): use it to rank "
                  "recipes only where it does")
    lines.append(f"* **The bound**: Spearman within draws {rq['spearman_within_draw']:.2f} [{lo:.2f}, {hi:.2f}]: {trust}.")
    head = ("No hyperparameter's effect separates from zero at this size: **this size supports no recommendation**; "
            "the intervals below say how large an effect it could have missed.\n\n" if supported == 0 else "")
    return head + "\n".join(lines)


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON: the merges table, the experts along
    the learning rate, the rank correlations per regime, the grid (centre, fine-tuning recipe, levels,
    step counts, seeds) and the sparsifying methods in the order they were merged. Equal to the
    ``claims`` stored there when they follow from its numbers (:func:`mergelab.report.claims.check_claims`)."""
    from ..training import FinetuneConfig

    g = results["grid"]
    grid = ExpertGrid(FinetuneConfig.from_params(g["finetune"], settings_name="centre", seed=g["seeds"][0], **g["centre"]),
                      {k: tuple(v) for k, v in g["levels"].items()}, checkpoints=tuple(g["checkpoints"]),
                      seeds=tuple(g["seeds"]), factorial=g["factorial"])
    r = nan_for_none(results)  # strict JSON: NaN (no bound for sparsified merges) was null
    merges = pd.DataFrame(r["merges"])
    sparsify = [m for m in dict.fromkeys(merges["method"]) if m != "weight_averaging"]
    return claims(merges, pd.DataFrame(r["experts_by_lr"]), r["rank_correlation"], grid, results["benchmark"],
                  sparsify=sparsify)
