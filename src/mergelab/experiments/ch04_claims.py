"""Chapter 04 (MASS routing): the chapter's claims, judged by the sampling error of its evaluations, and the storage
of the public benchmark's encoder they are set beside."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from ..analysis.statistics import (accuracy_difference_ci, band_status, claim, directional_status,
                                   normalized_difference_ci, proportion_ci)
from ..merging.mass_storage import model_shapes, storage_of_shapes
from ..utils import nan_for_none


REFERENCE_MODEL = "ViT-B-32"
"""The public benchmark's image encoder, whose storage the chapter sets beside the benchmark's own."""
REFERENCE_EVIDENCE = ("model", "storage_multiple", "largest_dense", "largest_dense_share")
"""What the storage claim's evidence keeps of :func:`reference_storage` (as ``reference_<key>``)."""


def reference_storage(num_tasks: int, model: str = REFERENCE_MODEL) -> dict[str, Any]:
    """MASS's storage (:func:`~mergelab.merging.mass.storage_of_shapes`) for open_clip's ``model`` image
    encoder with ``num_tasks`` tasks, from its shapes alone: the model is built on PyTorch's ``meta`` device
    (no weights, no download, milliseconds). Adds ``model``. An unknown name is an error listing open_clip's."""
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"model={model!r} is not valid; use one of open_clip's model names, e.g. "
                         f"{', '.join(open_clip.list_models()[:8])}, ...")
    with torch.device("meta"):
        visual = open_clip.CLIP(**cfg).visual
    return {"model": model, **storage_of_shapes(model_shapes(visual.state_dict()), num_tasks)}


def claims(methods: Mapping[str, Mapping[str, Any]], routing: Mapping[str, float], storage_multiple: float,
           timing: Mapping[str, Any], ablations: pd.DataFrame, block: int, size: str,
           test_sizes: Mapping[str, int], expert_validation: Mapping[str, float],
           storage_reference: Mapping[str, Any] | None = None, unchanged: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The chapter's claims, each ``{claim, source, status, evidence}``.

    Accuracy and routing claims are judged by the sampling error of the evaluated images (binomial per task,
    :func:`~mergelab.analysis.statistics.normalized_difference_ci`, Wilson's interval for routing): a claim
    is ``reproduced`` when its whole 95 % interval lies on the claimed side, ``not_reproduced`` when it lies
    wholly on the other, else ``not_testable``. ``test_sizes``: test inputs per task; ``expert_validation``:
    the experts' validation accuracy (the ablations' normalizer); ``storage_reference``: the same storage
    accounting on the public benchmark's encoder (:func:`reference_storage`), evidence beside the storage
    claim (its status reads this benchmark's figure only); ``unchanged``: the parameters no expert changed (frozen
    while they fine-tuned), stored once and not per task, named in that claim's evidence. The variation between
    fine-tuning seeds is not included (chapter 00 measures it)."""
    out = []

    def add(text: str, source: str, status: str, evidence: dict[str, Any]) -> None:
        out.append(claim(text, source, status, {**evidence, "size": size}))

    def acc(method: str) -> dict[str, float]:
        return dict(methods[method]["per_task_accuracy"])

    experts = acc("experts")
    mass = methods["mass"]["normalized_accuracy"]
    ci = normalized_difference_ci(acc("mass"), None, experts, dict(test_sizes))
    add("MASS, with no data and no training, keeps most of the experts' accuracy (paper: up to ~98 %; here at "
        "least 90 % normalized).", "mass2026", band_status(ci, 0.90, math.inf),
        {"mass_normalized": mass, "mass_normalized_ci": ci})
    tsv = methods["tsv_merge_validated"]["normalized_accuracy"]
    ci = normalized_difference_ci(acc("mass"), acc("tsv_merge_validated"), experts, dict(test_sizes))
    add("MASS beats TSV-M (ViT-B-32, 8 tasks, secondary source: 87.0 against 83.2; here by at least 5 normalized "
        "points against TSV-M with its coefficient chosen on validation).", "mass2026", band_status(ci, 0.05, math.inf),
        {"mass_normalized": mass, "tsv_merge_validated_normalized": tsv, "difference": mass - tsv, "difference_ci": ci})
    total = int(sum(test_sizes.values()))
    ci = proportion_ci(int(round(routing["contains_true"] * total)), total)
    add("Routing finds the task from the input alone: the true task is in the selected set for at least 90 % of "
        "inputs.", "mass2026", band_status(ci, 0.90, 1.0),
        {"contains_true": routing["contains_true"], "argmax_true": routing["argmax_true"], "contains_true_ci": ci})
    add("MASS stores about two models whatever the number of tasks (here at most 2.5x one model).", "mass2026",
        "reproduced" if storage_multiple <= 2.5 else "not_reproduced",
        {"storage_multiple": storage_multiple, "unchanged_stored_once": list(unchanged),
         **{f"reference_{k}": storage_reference[k] for k in REFERENCE_EVIDENCE if storage_reference is not None}})
    interval = timing["ratio_interval"]
    add("Two forward passes: MASS costs at most 3x one forward pass of a merged model per image (mixed batch, "
        "second-pass models cached, one torch thread on a CPU; the median ratio over paired timing rounds, judged "
        f"by its {interval['level']:.0%} bootstrap interval).", "mass2026", band_status(interval, 0.0, 3.0),
        {**{k: v for k, v in timing.items() if k != "ratio_interval"}, "ratio_ci_low": interval["ci_low"],
         "ratio_ci_high": interval["ci_high"]})
    layer = ablations[ablations["study"] == "layer"]
    first = ablations[ablations["study"] == "first_pass"]
    if len(first) and len(layer):
        own = layer[(layer["routing_matrix"] == "mlp.c_fc") & (layer["block"] == block)]
        pre = first[first["block"] == block]
        if len(own) and len(pre):
            a, b = float(own["contains_true"].iloc[0]), float(pre["contains_true"].iloc[0])
            n = int(sum(own["examples"].iloc[0].values()))
            ci = accuracy_difference_ci({"all": a}, {"all": b}, n)
            add("Routing on the TSV-M first pass beats routing on the pretrained model (secondary source: ~10 points "
                "at 20 tasks); validation split, default block.", "mass2026", directional_status(ci),
                {"tsv_merge_first_pass_contains_true": a, "pretrained_first_pass_contains_true": b,
                 "difference_ci": ci})
    sel = ablations[ablations["study"] == "selection"]
    if len(sel) and {1, 2} <= set(sel["top_k"]) and 0.2 in set(sel["threshold"]):
        at = sel[sel["threshold"] == 0.2].set_index("top_k")
        others = at.drop(1)["normalized_accuracy"]
        best = others.idxmax() if others.notna().any() else others.index[0]  # all NaN (an expert at 0): not testable
        ci = normalized_difference_ci(at.loc[best, "per_task_accuracy"], at.loc[1, "per_task_accuracy"],
                                      expert_validation, dict(at.loc[1, "examples"]))
        add("Selecting up to 2 or 3 tasks beats routing to one (official sweep: .944 / .959 / .958 normalized for "
            "top-k 1 / 2 / 3); validation split, threshold 0.2.", "mass2026", directional_status(ci),
            {**{f"top_k_{k}": float(v) for k, v in at["normalized_accuracy"].items()}, "best_top_k": int(best),
             "difference_ci": ci})
    return out


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (methods, routing, storage, timing,
    ablations, routing block, size): equal to the ``claims`` stored there when they follow from its
    numbers (:func:`mergelab.report.claims.check_claims`)."""
    r = nan_for_none(results)  # the JSON is strict: a NaN the chapter measured (an empty split) was written as null
    return claims(r["methods"], r["routing"], r["storage_multiple"], r["timing"], pd.DataFrame(r["ablations"]),
                  results["routing_block"], results["benchmark"], results["test_sizes"],
                  r["expert_validation_accuracy"], r.get("storage_reference"),
                  (results.get("storage") or {}).get("unchanged", ()))
