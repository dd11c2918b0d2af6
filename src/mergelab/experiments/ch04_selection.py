"""Chapter 04 (MASS routing): the selection (threshold and top-k) read from the ablation's selection study, against
the official defaults and as the router at the study's best."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..merging.mass import MassRouter


def selection_against_default(abl: pd.DataFrame, threshold: float, top_k: int) -> dict[str, Any] | None:
    """The selection study of :func:`~mergelab.experiments.ch04_mass.ablation` (rows with ``study == "selection"``)
    read against the defaults:
    ``{"default", "threshold", "top_k", "normalized_accuracy", "is_default"}``, the normalized accuracy at
    ``threshold`` and ``top_k`` and the best selection with its accuracy (fractions 0..1). Rows whose normalized
    accuracy is undefined (an expert at chance) are left out; ``None`` when the default is not among the rest."""
    rows = _scored(abl)
    at_default = rows[(rows["threshold"] == threshold) & (rows["top_k"] == top_k)]["normalized_accuracy"]
    if at_default.empty:
        return None
    best = _best(rows)
    return {"default": float(at_default.iloc[0]), "threshold": float(best["threshold"]), "top_k": int(best["top_k"]),
            "normalized_accuracy": float(best["normalized_accuracy"]),
            "is_default": (float(best["threshold"]), int(best["top_k"])) == (threshold, top_k)}


def validated_selection(router: MassRouter, abl: pd.DataFrame) -> tuple[MassRouter, dict[str, Any]]:
    """The router at the threshold and top-k the ablation's selection study found best on its split (validation),
    sharing ``router``'s second-pass cache, and what was chosen:
    ``{"threshold", "top_k", "validation_normalized", "chosen_on_validation", "threshold_acts", "at_grid_edge"}``.
    ``threshold_acts`` is false at top-k 1, where only the argmax is selected whatever the threshold; ``at_grid_edge``
    flags a choice at the largest top-k studied, or, where the threshold acts, at the smallest or largest threshold
    studied. The defaults need not be among the study's selections. Without a selection study the router's own
    options are returned (``chosen_on_validation`` false)."""
    best = _best(_scored(abl))
    if best is None:
        return router, {"threshold": router.threshold, "top_k": router.top_k, "validation_normalized": float("nan"),
                        "chosen_on_validation": False, "threshold_acts": router.top_k > 1, "at_grid_edge": False}
    threshold, top_k = float(best["threshold"]), int(best["top_k"])
    rows = abl[abl["study"] == "selection"]
    thresholds, ks = sorted(set(rows["threshold"])), sorted(set(rows["top_k"]))
    acts = top_k > 1
    edge = (top_k == ks[-1] and len(ks) > 1) or (acts and len(thresholds) > 1 and threshold in (thresholds[0],
                                                                                                  thresholds[-1]))
    tuned = router.with_options(threshold=threshold, top_k=top_k)
    return tuned, {"threshold": threshold, "top_k": top_k, "validation_normalized": float(best["normalized_accuracy"]),
                   "chosen_on_validation": True, "threshold_acts": acts, "at_grid_edge": bool(edge)}


def _scored(abl: pd.DataFrame) -> pd.DataFrame:
    """The selection study's rows whose normalized accuracy is defined (an expert at chance leaves it undefined)."""
    return abl[abl["study"] == "selection"].dropna(subset=["normalized_accuracy"])


def _best(rows: pd.DataFrame) -> pd.Series | None:
    """The row of largest normalized accuracy (the first of equals, in the study's order); ``None`` without rows."""
    if rows.empty:
        return None
    return rows.iloc[int(rows["normalized_accuracy"].to_numpy().argmax())]


__all__ = ["selection_against_default", "validated_selection"]
