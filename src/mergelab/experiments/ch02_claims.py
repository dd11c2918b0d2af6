"""Chapter 02 (task vectors as gradients): gains over zero-shot, the Taylor regime, and the
chapter's claims list with statuses from intervals.

A merge of early-epoch experts is compared with the merge of converged experts by its *gain over
zero-shot*, ``(merged_e - zero_shot) / (merged_converged - zero_shot)``: a ratio of absolute
accuracies reads as high even when both merges sit at zero-shot. Spreads come from the tasks (the
gain's bootstrap over tasks; Student's t over tasks for per-task alignment measures and slopes).
"""

from __future__ import annotations


from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.statistics import band_status, bootstrap_ci, claim, directional_status, mean_ci
from ..utils import nan_for_none

SOURCE = "zhou2025gradients"
"""Bibliography key of the seed paper (reports/references.bib)."""

SLOPE_TOLERANCE = 0.3
"""A measured log-log slope counts as the predicted one (1 for the gap, 2 for the residual) when its
95 % interval lies within this distance of it."""

MOST = 0.5
""""Most of" a gain: more than half of it."""


def _ratio(num: np.ndarray, den: np.ndarray, base: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return (num.mean(axis) - base.mean(axis)) / (den.mean(axis) - base.mean(axis))


def gain_over_zero_shot(per_task: Mapping[str, float], converged: Mapping[str, float], zero_shot: Mapping[str, float],
                        n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``(mean(per_task) - mean(zero_shot)) / (mean(converged) - mean(zero_shot))`` over the same tasks
    (test accuracies, fractions), with a 95 % bootstrap interval over tasks (NaN bounds when a
    resample's converged gain is 0: the ratio is then undefined), and the two gains in accuracy
    (``gain``, ``converged_gain``).

    Args:
        per_task: task to the accuracy of the model compared (e.g. the merge of one-epoch experts).
        converged: task to the accuracy of the reference (the merge of converged experts).
        zero_shot: task to the pretrained model's accuracy.
    """
    tasks = sorted(per_task)
    if set(tasks) != set(converged) or not set(tasks) <= set(zero_shot):
        raise ValueError(f"per_task and converged must cover the same tasks, all in zero_shot; got {sorted(per_task)}, "
                         f"{sorted(converged)} and {sorted(zero_shot)}.")
    a, c, z = (np.array([d[t] for t in tasks], dtype=float) for d in (per_task, converged, zero_shot))
    out = bootstrap_ci(_ratio, a, c, z, n_resamples=n_resamples, seed=seed, vectorized=True)
    out["method"] = "gain ratio, bootstrap over tasks (percentile)"
    if not (np.isfinite(out["ci_low"]) and np.isfinite(out["ci_high"])):  # a resampled converged gain of 0
        out["ci_low"] = out["ci_high"] = float("nan")  # the interval is undefined, not infinite
    return {**out, "gain": float(a.mean() - z.mean()), "converged_gain": float(c.mean() - z.mean())}


ROUNDING_MARGIN = 10.0
"""A gap counts towards a slope only when it is this many times its run's rounding floor (below)."""


def taylor_regime(taylor: Any, lambda_max: Mapping[str, float]) -> pd.DataFrame:
    """The expansion parameter ``eta * lambda_max * k`` of each full-batch run (``k`` steps) at its
    last snapshot, per task and learning rate: columns ``task``, ``lr``, ``steps``, ``lambda_max``,
    ``eta_lambda_k``, ``relative_gap``, ``relative_residual``, and the run's rounding floor. The
    second-order expansion holds while ``eta_lambda_k`` is below 1.

    After one step of full-batch gradient descent the task vector *is* ``-eta g``, so the gap measured
    there is rounding alone (``floor``: the norm of the weights times the precision's epsilon, about
    1e-6 for this size's float32 weights). ``gap_above_floor`` and ``residual_above_floor`` say
    whether the last snapshot's gap and residual exceed :data:`ROUNDING_MARGIN` times it: a task whose
    gradient at ``theta_0`` is tiny (a frozen head already right on most examples) has a gap made of
    rounding, whose slope against the learning rate says nothing about the expansion.

    Args:
        taylor: :func:`mergelab.analysis.alignment.taylor_table` (with its one-step rows).
        lambda_max: task to the largest Hessian eigenvalue of its loss at ``theta_0``.
    """
    k = int(taylor["steps"].max())
    cols = ["task", "lr", "steps", "relative_gap", "relative_residual", "gap_norm", "residual_norm"]
    last = taylor[taylor["steps"] == k][cols].copy()
    floor = taylor[taylor["steps"] == 1].set_index(["task", "lr"])["gap_norm"]
    last["floor"] = [float(floor.get((t, lr), float("nan"))) for t, lr in zip(last["task"], last["lr"])]
    for q in ("gap", "residual"):
        last[f"{q}_above_floor"] = last[f"{q}_norm"] > ROUNDING_MARGIN * last["floor"]
    last["lambda_max"] = last["task"].map(lambda_max).astype(float)
    last["eta_lambda_k"] = last["lr"] * last["lambda_max"] * last["steps"]
    return last.reset_index(drop=True)


def _log_slope(x: Sequence[float], y: Sequence[float]) -> float:
    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return float("nan")
    return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def taylor_slopes(regime: pd.DataFrame, limit: float = 1.0) -> dict[str, Any]:
    """Log-log slopes against the learning rate of the relative gap (predicted 1) and of the residual
    after the second-order term (predicted 2), per task over the learning rates inside the regime
    (``eta_lambda_k < limit``) whose gap (residual) is above the rounding floor (:func:`taylor_regime`),
    and their Student-t intervals over the tasks with two such learning rates or more; also over all
    learning rates.

    Returns:
        ``{"in_regime": {"gap": mean_ci, "residual": mean_ci, "learning_rates": [...],
        "at_rounding_floor": {"gap": [[task, lr], ...], "residual": [...]}}, "all": {...}, "limit"}``.
    """
    out = {}
    for name, part in (("in_regime", regime[regime["eta_lambda_k"] < limit]), ("all", regime)):
        slopes, floored = {}, {}
        for q in ("gap", "residual"):
            above = part[f"{q}_above_floor"] if f"{q}_above_floor" in part else pd.Series(True, index=part.index)
            above = above.astype(bool)
            slopes[q] = [_log_slope(d["lr"], d[f"relative_{q}"]) for _, d in part[above].groupby("task")]
            floored[q] = [[t, float(lr)] for t, lr in zip(part["task"][~above], part["lr"][~above])]
        out[name] = {"gap": mean_ci(slopes["gap"]), "residual": mean_ci(slopes["residual"]),
                     "learning_rates": sorted({float(v) for v in part["lr"]}), "at_rounding_floor": floored}
    out["limit"] = limit
    return out


def _per_task_mean_ci(alignment: Any, optimizer: str, lr: float, epoch: int, column: str, offset: float = 0.0
                      ) -> dict[str, Any]:
    part = alignment[(alignment["optimizer"] == optimizer) & (alignment["lr"] == float(lr))
                     & (alignment["epoch"] == epoch)]
    # the interval is of (column - offset), tested against 0; ``subtracted`` records the offset (1/E, 1/sqrt(E))
    return {**mean_ci(part[column].to_numpy(float) - offset), "subtracted": offset}


def claims(results: Mapping[str, Any], alignment: Any, slopes: Mapping[str, Any], epochs: int, size: str,
           expert_gain: Mapping[str, Mapping[str, Any]], alignment_lrs: Mapping[str, float]) -> list[dict[str, Any]]:
    """The chapter's claims, ``{claim, source, status, evidence}`` each.

    Args:
        results: the chapter's results (``one_step_exactness``, ``merged_accuracy_by_epochs``,
            ``merged_converged``, ``zero_shot``, ``merge_learning_rates``).
        alignment: the ``total`` rows of :func:`mergelab.analysis.alignment.alignment_table`.
        slopes: :func:`taylor_slopes`.
        epochs: the trajectories' number of epochs E.
        expert_gain: optimizer to epoch (a string) to :func:`gain_over_zero_shot` of its experts on
            their own tasks against the converged experts (the precondition of the merging claim).
        alignment_lrs: optimizer to the learning rate of the ``alignment`` runs the alignment claims
            use.
    """
    out = []

    def add(text: str, status: str, evidence: Mapping[str, Any]) -> None:
        out.append(claim(text, SOURCE, status, {**evidence, "size": size}))

    one = results["one_step_exactness"]
    worst = {dt: max(r["relative_error"] for r in res["per_task"].values()) / res["gradient_step"]["machine_epsilon"]
             for dt, res in one.items()}
    ta = {dt: res["task_arithmetic"]["relative_error"] / res["gradient_step"]["machine_epsilon"] for dt, res in one.items()}
    # exact up to rounding: within 1000 machine epsilons in every precision (a software check: true by construction)
    add("After one full-batch gradient step, the task vector is exactly -eta times the task's gradient (to rounding: "
        "within 1000 machine epsilons in every precision).", "reproduced" if max(worst.values()) < 1e3 else
        "not_reproduced", {"worst_relative_error_in_epsilons": worst})
    add("Task arithmetic with coefficient 1 of one-step experts is one multi-task gradient step (to rounding).",
        "reproduced" if max(ta.values()) < 1e3 else "not_reproduced", {"relative_error_in_epsilons": ta})
    for opt, lr in alignment_lrs.items():
        cos1 = _per_task_mean_ci(alignment, opt, lr, 1, "cosine")
        add(f"The first-epoch task vector points along the negative gradient at theta_0 ({opt}, lr {lr:g}): cosine "
            "above 0 (over tasks).", directional_status(cos1, "positive"), cos1)
        share = _per_task_mean_ci(alignment, opt, lr, epochs, "first_epoch_share", 1 / epochs)
        add(f"The first epoch dominates the trajectory in norm ({opt}, lr {lr:g}): its share of tau after {epochs} "
            f"epochs exceeds 1/{epochs}, the share of epochs that contribute alike.",
            directional_status(share, "positive"), {**share, "effect": "share - 1/E"})
        direction = _per_task_mean_ci(alignment, opt, lr, epochs, "first_epoch_cosine", 1 / np.sqrt(epochs))
        add(f"The first epoch dominates the trajectory in direction ({opt}, lr {lr:g}): the cosine of tau_1 with tau "
            f"after {epochs} epochs exceeds 1/sqrt({epochs}), its value for epochs of equal norm in unrelated directions.",
            directional_status(direction, "positive"), {**direction, "effect": "cosine - 1/sqrt(E)"})
    zs = results["zero_shot"]["per_task_accuracy"]
    for opt, by_method in results["merged_accuracy_by_epochs"].items():
        pre = expert_gain[opt][min(expert_gain[opt], key=int)]
        ready = np.isfinite(pre["ci_low"]) and pre["ci_low"] > MOST
        for method, by_epoch in by_method.items():
            first = min(by_epoch, key=int)
            conv = results["merged_converged"][method]["per_task_accuracy"]
            g = gain_over_zero_shot(by_epoch[first]["per_task_accuracy"], conv, zs)
            status = directional_status({**g, "ci_low": g["ci_low"] - MOST, "ci_high": g["ci_high"] - MOST})
            if not ready:  # experts that have not learned their tasks cannot test the claim
                status = "not_testable"
            add(f"Merging experts after {first} epoch{'s' if int(first) > 1 else ''} retains most (over half) of the "
                f"converged merge's gain over zero-shot ({method}, {opt}).", status,
                {**g, "threshold": MOST, "one_epoch_experts_gain_ratio": pre, "experts_ready": bool(ready)})
    tol = SLOPE_TOLERANCE
    reg = slopes["in_regime"]
    for q, pred in (("gap", 1.0), ("residual", 2.0)):
        iv = reg[q]
        add(f"Inside the regime eta * lambda_max * k < {slopes['limit']:g}, tau + eta k grad L(theta_0) grows like "
            + ("eta (log-log slope 1: the second-order term)" if q == "gap" else
               "eta^2 after subtracting the second-order term (slope 2)") + f", within {tol:g} (over tasks; "
            f"runs whose {q} is within {ROUNDING_MARGIN:g}x float rounding left out).",
            band_status(iv, pred - tol, pred + tol) if len(reg["learning_rates"]) >= 2 else "not_testable",
            {**iv, "predicted": pred, "learning_rates_in_regime": reg["learning_rates"],
             "at_rounding_floor": reg.get("at_rounding_floor", {}).get(q, []), "all_learning_rates": slopes["all"][q]})
    return out


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (the per-epoch alignment rows, the
    Taylor slopes, E, the experts' gain over zero-shot and the learning rates the alignment claims read):
    equal to the ``claims`` stored there when they follow from its numbers
    (:func:`mergelab.report.claims.check_claims`)."""
    r = nan_for_none(results)  # strict JSON: NaN was null
    return claims(r, pd.DataFrame(r["per_epoch_cosines"]), r["taylor_slopes"], results["epochs"], results["benchmark"],
                  r["gain_over_zero_shot"]["experts"], results["alignment_learning_rates"])
