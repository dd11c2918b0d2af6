"""Chapter 05 (MERGE3): the chapter's claims, each judged by its rule on the numbers the chapter stores, and the
summaries they read (the estimators' errors and rank correlations)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.irt import IRTModel, fit_ability
from ..analysis.statistics import both, claim, sample_sd, seed_status
from ..utils import nan_for_none


def endpoint_fit(model: IRTModel, endpoint_theta: np.ndarray, endpoint_responses: np.ndarray, names: Sequence[str],
                 item_task: Sequence[str]) -> tuple[pd.DataFrame, int]:
    """The endpoints' abilities read through what they predict (an ability's coordinates mean nothing alone: the
    model is free up to a rotation): per task, the mean ``P(correct)`` at each endpoint's ability.

    Args:
        endpoint_theta: ``(K, D)`` abilities; ``endpoint_responses``: their ``(K, N)`` 0/1 answers; ``names``:
            their names (``"zero_shot"``, ``"expert:<task>"``); ``item_task``: the task of each of the ``N`` items.

    Returns:
        the table (one row per endpoint, one column per task, then ``mean |IRT - observed|``: the mean over
        tasks of the distance from the accuracy the endpoint really has), and how many experts have their
        largest rise over zero-shot on their own task.
    """
    fit, observed = _per_task(model, endpoint_theta, endpoint_responses, names, item_task)
    rise = fit - fit.loc["zero_shot"]
    own = sum(rise.loc[f"expert:{t}"].idxmax() == t for t in fit.columns if f"expert:{t}" in rise.index)
    return fit.assign(**{"mean |IRT - observed|": (fit - observed).abs().mean(axis=1)}), int(own)


def _per_task(model: IRTModel, theta: np.ndarray, responses: np.ndarray, names: Sequence[str],
              item_task: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model (rows ``names``) and task (columns, in the items' order): the mean ``P(correct)`` at ``theta``
    ``(K, D)`` and the observed accuracy of ``responses`` ``(K, N)``."""
    task_of = np.asarray(item_task)
    tasks = list(dict.fromkeys(task_of.tolist()))
    prob = model.prob(np.asarray(theta, dtype=float))
    answers = np.asarray(responses, dtype=float)
    fit = pd.DataFrame([[prob[k, task_of == t].mean() for t in tasks] for k in range(len(names))], index=list(names),
                       columns=tasks)
    observed = pd.DataFrame([[answers[k, task_of == t].mean() for t in tasks] for k in range(len(names))],
                            index=list(names), columns=tasks)
    return fit, observed


def known_models(model: IRTModel, endpoint_theta: np.ndarray, endpoint_responses: np.ndarray,
                 endpoints: Sequence[str], item_task: Sequence[str], multitask: np.ndarray | None = None,
                 outside: np.ndarray | None = None, in_population: bool = False,
                 outside_theta: np.ndarray | None = None) -> tuple[pd.DataFrame, int, str]:
    """The known models as the IRT model reads them: :func:`endpoint_fit` of the endpoints and, last, of the
    multi-task model (its ability fitted on every item), with a sentence setting the multi-task model's reading
    against models read out of sample too.

    Args:
        endpoint_theta, endpoint_responses, endpoints: as :func:`endpoint_fit` takes them (``"zero_shot"`` first).
        multitask: the multi-task model's ``(N,)`` 0/1 answers; ``None``: no multi-task row and no sentence.
        outside: ``(M, N)`` answers of models that did not calibrate the items (the merges that chose D), each read
            from its ability fitted on every item.
        in_population: whether the multi-task model calibrated the items.
        outside_theta: ``(M, D)`` abilities of ``outside``'s models fitted on every item, when the caller holds them
            (the notebook fits every population model's once); ``None``: fitted here.

    Returns:
        ``(table, own, sentence)``: the table and count of :func:`endpoint_fit`, and the sentence ("" without a
        multi-task model).
    """
    everything = np.arange(model.num_items)
    names, theta, answers = list(endpoints), np.asarray(endpoint_theta), np.asarray(endpoint_responses)
    if multitask is not None:
        names.append("multitask")
        theta = np.vstack([theta, fit_ability(model, everything, multitask)])
        answers = np.vstack([answers, multitask])
    table, own = endpoint_fit(model, theta, answers, names, item_task)
    if multitask is None:
        return table, own, ""
    error = "mean |IRT - observed|"
    read = table.loc["multitask", error]
    text = (f" The multi-task model ({'one of the calibration models' if in_population else 'not among the calibration models'}) "
            f"is read with a mean error of {read:.3f} per task")
    beyond = None
    if outside is not None and len(outside):
        abilities = (np.asarray(outside_theta) if outside_theta is not None else
                     np.vstack([fit_ability(model, everything, r) for r in outside]))
        fit, observed = _per_task(model, abilities, outside,
                                  [f"outside:{i}" for i in range(len(outside))], item_task)
        beyond = (fit - observed).abs().mean(axis=1)
        text += (f"; the {len(beyond)} merges that chose D, also outside the calibration, with {beyond.median():.3f} "
                 f"(median) to {beyond.max():.3f}")
    text += f"; the endpoints, which calibrated the items, with at most {table.loc[list(endpoints), error].max():.3f}."
    if beyond is not None and read > beyond.max() and not in_population:
        text += " An ability outside what the merges span is read less well than the merges are."
    return table, own, text


def summarize_ranks(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per (fraction, n, estimator) of :func:`population_rank_study`: the Spearman correlation's mean,
    standard deviation (ddof 1; 0 for one draw), minimum and number of draws, with the size's
    ``fitness_sd`` and ``subset_se``."""
    g = ranks.groupby(["fraction", "n", "estimator"], sort=False)
    out = g["spearman"].agg(spearman="mean", spearman_min="min", draws="count").reset_index()
    out["spearman_sd"] = g["spearman"].agg(sample_sd).to_numpy()
    out["fitness_sd"] = g["fitness_sd"].first().to_numpy()
    out["subset_se"] = g["subset_se"].first().to_numpy()
    return out


def nearest_fraction(fractions: Any, target: float) -> float:
    """The subset fraction among ``fractions`` (any iterable, repeats allowed) nearest ``target`` (the first of a tie,
    in sorted order)."""
    return float(min(sorted(set(fractions)), key=lambda f: abs(f - target)))


def best_rank_at(summary: pd.DataFrame, fraction: float) -> pd.Series:
    """The row of :func:`summarize_ranks` with the highest mean Spearman at the size nearest ``fraction``."""
    nearest = nearest_fraction(summary["fraction"], fraction)
    at = summary[summary["fraction"] == nearest]
    return at.loc[at["spearman"].idxmax()]


def choose_estimator(study: pd.DataFrame, fraction: float = 0.05) -> dict[str, Any]:
    """The IRT estimator (not the subset mean) of least mean absolute error at the size nearest ``fraction``,
    random anchors, in an estimator study (rows per draw, as :func:`~mergelab.experiments.ch05_merge3.estimator_study`
    returns) of *other* merges than those an accuracy claim is judged on (the chapter: the merges that chose
    the IRT dimension). Returns ``{"estimator", "fraction", "n", "mae"}`` (``mae``: per estimator, on these
    merges)."""
    rnd = study[study["scheme"] == "random"]
    if rnd.empty:
        raise ValueError("the study has no rows with random anchors; run it with 'random' among its schemes.")
    f = nearest_fraction(rnd["fraction"], fraction)
    mae = rnd[rnd["fraction"] == f].groupby("estimator")["mae"].mean()
    irt = mae.drop(index="subset_mean", errors="ignore")
    return {"estimator": str(irt.idxmin()), "fraction": float(f), "n": int(rnd[rnd["fraction"] == f]["n"].iloc[0]),
            "mae": {k: float(v) for k, v in mae.items()}}


def fitness_costs(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The two searches' fitness forward passes, from their rows (:func:`~mergelab.experiments.ch05_merge3.search`,
    the IRT row with :func:`~mergelab.experiments.ch05_merge3.one_off_passes` added): ``full`` (every candidate's
    full answers), ``irt`` (the candidates' subsets plus the endpoints' full answers, as the claim counts),
    ``irt_with_calibration`` (plus the other models the IRT model was fitted on) and ``ratio`` /
    ``ratio_with_calibration`` (full over each; how many times fewer); ``ratio_ceiling``, the ``ratio`` a search
    approaches as its evaluations grow (the one-off endpoint cost then vanishes): images per full-fitness
    evaluation over images per IRT-fitness evaluation, i.e. 1 / the subset's fraction of the items. A ratio
    target above the ceiling cannot be reached at that subset size, however long the search."""
    irt_row, full_row = rows["evolved_irt"], rows["evolved_full"]
    full = full_row["fitness_forward_passes"]
    irt = irt_row["fitness_forward_passes"] + irt_row.get("endpoint_forward_passes", 0)
    with_calibration = irt + irt_row.get("calibration_forward_passes", 0)
    evals_full, evals_irt, subsets = full_row.get("evaluations"), irt_row.get("evaluations"), irt_row["fitness_forward_passes"]
    ceiling = (full / evals_full) / (subsets / evals_irt) if evals_full and evals_irt and subsets else float("nan")
    return {"full": full, "irt": irt, "irt_with_calibration": with_calibration, "ratio": full / max(irt, 1),
            "ratio_with_calibration": full / max(with_calibration, 1), "ratio_ceiling": ceiling}


def claims(errors: pd.DataFrame, ranks: pd.DataFrame, rows: Mapping[str, Mapping[str, Any]], size: str,
           seeds: pd.DataFrame | None = None, draws: pd.DataFrame | None = None, chosen: str | None = None,
           fitness_estimator: str = "gmp_irt") -> list[dict[str, Any]]:
    """The chapter's claims ``{claim, source, status, evidence}`` from the estimator summary on the held-out merges
    (:func:`~mergelab.experiments.ch05_merge3.summarize_estimators`), the GA-population rank study
    (:func:`~mergelab.experiments.ch05_merge3.population_rank_study`, one row per draw: the rank claim weighs the
    mean over draws against its spread), the search rows and, when given,
    :func:`~mergelab.experiments.ch05_merge3.seed_searches` (the two search claims are then judged over GA seeds).

    ``chosen``: the IRT estimator the accuracy claim reads, chosen on other merges than the held-out ones
    (:func:`choose_estimator`); ``None`` takes the best on the held-out merges themselves, which flatters it.
    ``draws``: the estimator study per subset draw (its rows before :func:`summarize_estimators`): MERGE3's claim
    against the subset mean is then judged on the paired differences over draws; ``fitness_estimator`` is the
    estimator MERGE3's search uses (gmp-IRT)."""
    out = []
    rnd = errors[errors["scheme"] == "random"]
    f5 = nearest_fraction(rnd["fraction"], 0.05)
    at5 = rnd[rnd["fraction"] == f5].set_index("estimator")
    mean5 = float(at5.loc["subset_mean", "mae"])
    irt5 = at5.drop(index="subset_mean")
    if chosen is None:
        chosen, chosen_on = str(irt5["mae"].idxmin()), "the same held-out merges (no validation merges given)"
    else:
        chosen_on = "the validation merges, before the held-out ones were read"
    mae = float(at5.loc[chosen, "mae"])
    out.append(claim(f"An IRT estimator from {f5:.0%} of the fitness items is within .02 of the full fitness "
                     "(mean absolute error over held-out merges; tinyBenchmarks: .010-.029 from 100 items).",
                     "polo2024tinybenchmarks", "reproduced" if mae <= 0.02 else "not_reproduced",
                     {"estimator": chosen, "chosen_on": chosen_on, "mae": mae, "n": int(at5.loc[chosen, "n"]),
                      "best_on_held_out": str(irt5["mae"].idxmin()), "subset_mean_mae": mean5, "size": size}))
    if draws is not None:  # paired: each draw's subset serves both estimators
        d = draws[(draws["scheme"] == "random") & (draws["fraction"] == f5)].pivot(
            index="draw", columns="estimator", values="mae")
        diffs = (d["subset_mean"] - d[fitness_estimator]).to_numpy(dtype=float)
    else:
        diffs = np.array([mean5 - float(at5.loc[fitness_estimator, "mae"])])
    out.append(claim(f"MERGE3's fitness estimator ({fitness_estimator}) beats the plain subset mean at {f5:.0%} of the "
                     "items (mean absolute error over held-out merges, paired over subset draws).",
                     "mencattini2025merge3", seed_status(diffs, 0.0),
                     {"estimator": fitness_estimator, "mae": float(at5.loc[fitness_estimator, "mae"]),
                      "subset_mean_mae": mean5, "difference_per_draw": diffs.round(5).tolist(),
                      "rule": "subset mean's error minus the estimator's, per subset draw, weighed by twice their SD "
                              "(seed_status)", "size": size}))
    best_rank = best_rank_at(summarize_ranks(ranks), 0.05)
    values = ranks[(ranks["n"] == best_rank["n"]) & (ranks["estimator"] == best_rank["estimator"])]["spearman"]
    out.append(claim("Estimated fitness ranks a GA population as the full fitness does (Spearman >= .9 at 5 % of "
                     "the items).", "mencattini2025merge3", seed_status(values.to_numpy(), 0.9),
                     {"estimator": best_rank["estimator"], "spearman": float(best_rank["spearman"]),
                      "spearman_sd": float(best_rank["spearman_sd"]), "spearman_per_draw": values.round(4).tolist(),
                      "n": int(best_rank["n"]), "fitness_sd": float(best_rank["fitness_sd"]),
                      "subset_se": float(best_rank["subset_se"]), "rule": "mean over subset draws against .9, "
                      "weighed by twice their SD (seed_status)", "size": size}))
    irt_row, full_row, ta = rows["evolved_irt"], rows["evolved_full"], rows["task_arithmetic_grid"]
    gap = full_row["absolute_accuracy"] - irt_row["absolute_accuracy"]
    costs = fitness_costs(rows)
    ratio, with_calibration = costs["ratio"], costs["ratio_with_calibration"]
    gaps = np.array([gap]) if seeds is None else seeds["gap"].to_numpy(dtype=float)
    irt_abs = np.array([irt_row["absolute_accuracy"]]) if seeds is None else seeds["irt_absolute"].to_numpy(dtype=float)
    per_seed = {"seeds": [] if seeds is None else seeds["seed"].tolist(), "rule": "per GA seed, weighed by twice "
                "the SD over seeds (seed_status); one seed: its value alone"}
    out.append(claim("Evolving with IRT fitness reaches the merge evolved with full fitness (within .01 test "
                     "accuracy) for >= 20x fewer fitness forward passes (MERGE3: ~50x cheaper).",
                     "mencattini2025merge3",
                     both(seed_status(0.01 - gaps, 0.0), "reproduced" if ratio >= 20 else "not_reproduced"),
                     {"gap": float(gap), "gap_per_seed": gaps.round(4).tolist(), "gap_mean": float(gaps.mean()),
                      "gap_sd": sample_sd(gaps), **per_seed, "forward_pass_ratio": float(ratio),
                      "forward_pass_ratio_with_calibration": float(with_calibration),
                      "forward_pass_ratio_ceiling": float(costs["ratio_ceiling"]),
                      "counted": "search candidates' subset images + the endpoints' full answers (the IRT fit's "
                                 "population, a one-off cost, only in the ratio with calibration)", "size": size}))
    out.append(claim("The evolved merge beats task arithmetic validated by grid on test accuracy.",
                     "mencattini2025merge3", seed_status(irt_abs - ta["absolute_accuracy"], 0.0),
                     {"evolved_irt": irt_row["absolute_accuracy"], "evolved_irt_per_seed": irt_abs.round(4).tolist(),
                      "task_arithmetic": ta["absolute_accuracy"], **per_seed, "size": size}))
    return out


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (estimator errors, the GA-population
    rank study, the methods' rows and the searches per GA seed): equal to the ``claims`` stored there when
    they follow from its numbers (:func:`mergelab.report.claims.check_claims`)."""
    r = nan_for_none(results)  # strict JSON: a measured NaN was written as null
    return claims(pd.DataFrame(r["estimator_errors"]), pd.DataFrame(r["ga_population_rank_correlation"]), r["methods"],
                  results["benchmark"], seeds=None if results.get("search_seeds") is None else pd.DataFrame(r["search_seeds"]),
                  draws=pd.DataFrame(r["estimator_draws"]) if r.get("estimator_draws") else None,
                  chosen=(r.get("estimator_choice") or {}).get("estimator"),
                  fitness_estimator=r["evolution"]["estimator"])


BOUND_TOLERANCE = 0.02
"""Share of the search's range ``[0, coefficient_max]`` within which an evolved coefficient counts as at an end."""


def range_ends(coefficients: Mapping[str, float], coefficient_max: float) -> dict[str, list[str]]:
    """``{"at_lower_bound": [task, ...], "at_upper_bound": [task, ...]}``: the tasks whose evolved coefficient lies
    within :data:`BOUND_TOLERANCE` of the range at its bottom (0: the search dropped that task's vector) or its top
    (``coefficient_max``: the best coefficient may lie beyond the range), as a validation grid's ends are flagged."""
    tol = BOUND_TOLERANCE * coefficient_max
    return {"at_lower_bound": [t for t, c in coefficients.items() if c <= tol],
            "at_upper_bound": [t for t, c in coefficients.items() if c >= coefficient_max - tol]}


def range_note(rows: Mapping[str, Mapping[str, Any]], coefficient_max: float,
               names: Mapping[str, str] | None = None) -> str:
    """A sentence for the chapter's text on the searches' rows (:func:`search`): which tasks' evolved coefficients
    lie at the top of the range (the best may lie beyond ``coefficient_max``: a wider range could do better) or at
    its bottom (the search dropped the task's vector), or that every coefficient lies inside the range."""
    parts = []
    for key, r in rows.items():
        name = (names or {}).get(key, key)
        if r["at_upper_bound"]:
            parts.append(f"{name} puts {', '.join(r['at_upper_bound'])} at the top of its range ({coefficient_max:g}; "
                         "the best coefficient may lie beyond it, so a wider range could do better)")
        if r["at_lower_bound"]:
            parts.append(f"{name} puts {', '.join(r['at_lower_bound'])} at the bottom of its range (0: that task's "
                         "vector is left out)")
    if not parts:
        return f"Every evolved coefficient lies inside the search's range (0 to {coefficient_max:g})."
    return "Of the evolved coefficients, " + "; ".join(parts) + "."
