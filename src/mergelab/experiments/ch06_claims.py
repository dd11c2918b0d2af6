"""Chapter 06 (C2M3): the chapter's claims, each judged by its rule on the numbers the chapter stores, and the rule
for a difference across sets of merged models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..analysis.statistics import claim
from ..utils import nan_for_none

SOURCE = "crisostomi2024c2m3"  # key of reports/references.bib (Crisostomi et al., NeurIPS 2024)

HOLDS = {"ahead": True, "behind": False}
"""A claim that a difference is positive, by its direction (:func:`sets_direction`): reproduced when ahead, not
reproduced when behind; unresolved (within two standard errors of 0) neither supports nor contradicts it, so the
claim is not testable, as the book's claims page defines the three statuses."""


def sets_direction(summary: Mapping[str, Any]) -> str | None:
    """The chapter's rule for a difference across sets of models (:func:`across_sets`), both signs: ``"ahead"``
    when its mean exceeds two standard errors across sets, ``"behind"`` when it is below minus two,
    ``"unresolved"`` otherwise, ``None`` when there are too few sets for a standard error."""
    se = summary.get("standard_error")
    if se is None:
        return None
    return "ahead" if summary["mean"] > 2 * se else "behind" if summary["mean"] < -2 * se else "unresolved"


def sets_separated(summary: Mapping[str, Any]) -> bool | None:
    """Whether the difference is ahead of 0 by :func:`sets_direction` (the ``separated`` field of
    :func:`~mergelab.experiments.ch06_c2m3.across_sets`): ``True`` when ahead, ``False`` when behind or unresolved,
    ``None`` when there is no rule. The claims read the direction itself (:data:`HOLDS`)."""
    direction = sets_direction(summary)
    return None if direction is None else direction == "ahead"


def claims(arch_results: Mapping[str, Mapping[str, Any]], mlp_fraction: float = 0.9) -> list[dict[str, Any]]:
    """The chapter's claims, each ``{claim, source, status, evidence}``, from the per-architecture
    results (``methods``, ``cycle_errors``, ``paired``, and ``merge_sets`` of :func:`across_sets` where
    several sets of models were merged) that the notebook writes."""
    out: list[dict[str, Any]] = []

    def add(text: str, holds: bool | None, evidence: dict[str, Any]) -> None:
        status = "not_testable" if holds is None else ("reproduced" if holds else "not_reproduced")
        out.append(claim(text, SOURCE, status, evidence))

    for arch, r in arch_results.items():
        m = r["methods"]
        add(f"{arch}: averaging models trained from different initializations without alignment falls far "
            "below the endpoints (less than half their mean accuracy)",
            m["naive"]["accuracy"] < 0.5 * m["endpoints"]["accuracy"],
            {"naive": m["naive"]["accuracy"], "endpoints_mean": m["endpoints"]["accuracy"]})
        cyc = r["cycle_errors"]
        add(f"{arch}: C2M3's pairwise maps are cycle-consistent (error 0) while independent pairwise weight "
            "matching's are not", cyc["c2m3"]["mean"] == 0 and cyc["pairwise"]["mean"] > 0,
            {"c2m3": cyc["c2m3"]["mean"], "pairwise": cyc["pairwise"]["mean"]})
    if "mlp" in arch_results:
        m = arch_results["mlp"]["methods"]
        add(f"mlp: the C2M3 merge keeps at least {mlp_fraction:g} x the endpoints' mean accuracy (EMNIST MLP in "
            "the paper: .87 merged)", m["c2m3"]["accuracy"] >= mlp_fraction * m["endpoints"]["accuracy"],
            {"c2m3": m["c2m3"]["accuracy"], "endpoints_mean": m["endpoints"]["accuracy"],
             "ratio": m["c2m3"]["relative_to_endpoints"]})
    if "resnet" in arch_results:
        r = arch_results["resnet"]
        m, paired = r["methods"], r["paired"]["c2m3_repair_vs_merge_many_repair"]
        sets = r.get("merge_sets") or {}
        direction = sets_direction(sets)
        if direction is not None:  # several sets of models: the spread between sets counts
            add(f"resnet: C2M3 with REPAIR is above MergeMany with REPAIR (mean paired difference over "
                f"{sets['n']} sets of models above two standard errors across sets; CIFAR-10 ResNet-20x2 in the "
                "paper: .69 vs .50)", HOLDS.get(direction),
                {"c2m3_repair": m["c2m3_repair"]["accuracy"], "merge_many_repair": m["merge_many_repair"]["accuracy"],
                 "mean_difference": sets["mean"], "standard_error_across_sets": sets["standard_error"],
                 "sets": sets["n"], "sets_positive": sets["positive"], "sets_negative": sets["negative"],
                 "first_set": paired, **({"alignment_objective": sets["objective"]} if "objective" in sets else {})})
        else:
            add("resnet: C2M3 with REPAIR is above MergeMany with REPAIR (paired difference over two standard "
                "errors; CIFAR-10 ResNet-20x2 in the paper: .69 vs .50)",
                HOLDS.get(sets_direction({"mean": paired["difference"], "standard_error": paired["standard_error"]})),
                {"c2m3_repair": m["c2m3_repair"]["accuracy"], "merge_many_repair": m["merge_many_repair"]["accuracy"],
                 **paired})
        add("resnet: C2M3 with REPAIR is above naive averaging by a wide margin (over .3)",
            m["c2m3_repair"]["accuracy"] - m["naive"]["accuracy"] > 0.3,
            {"c2m3_repair": m["c2m3_repair"]["accuracy"], "naive": m["naive"]["accuracy"]})
    if {"mlp", "resnet"} <= set(arch_results):
        gain = {a: arch_results[a]["methods"]["c2m3_repair"]["accuracy"] - arch_results[a]["methods"]["c2m3"]["accuracy"]
                for a in ("mlp", "resnet")}
        add("Once the models are aligned, REPAIR matters for conv nets, not for MLPs: its gain on the C2M3 merge is "
            "larger for the ResNet",
            gain["resnet"] > gain["mlp"], {"gain_mlp": gain["mlp"], "gain_resnet": gain["resnet"]})
    return out


def claims_from_results(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """:func:`claims` computed again from the chapter's results JSON (its ``architectures``): equal to the
    ``claims`` stored there when they follow from its numbers (:func:`mergelab.report.claims.check_claims`)."""
    arch = {name: {k: (v if k == "merge_sets" else nan_for_none(v)) for k, v in r.items()}  # strict JSON: NaN was null
            for name, r in results["architectures"].items()}
    return claims(arch)


ALIGNED = ("merge_many", "merge_many_repair", "c2m3", "c2m3_repair")
"""The merges that map the models into one frame before averaging."""

CLEAR = 0.05
"""Accuracy difference the ViT's reading calls clear: about twice the paired standard error of a difference between
two merges on the 450 digits test images, which the chapter prints with its results."""


def vit_reading(methods: Mapping[str, Mapping[str, float]], cosine_after: Mapping[str, float],
                kept: Mapping[str, float], num_classes: int) -> str:
    """The notebook's paragraph on the ViT, every clause chosen by the numbers it states; when the endpoints
    themselves are below twice chance (nothing learnt, e.g. at the smoke size) it says only that the merges test
    nothing.

    Args:
        methods: the ViT's ``methods`` (accuracy per merge, ``naive`` and ``endpoints`` among them; fractions).
        cosine_after: kind of weight to its cosine after matching (``weight_similarity``'s ``cosine_after``);
            it must hold ``transformer.resblocks.*.mlp.c_fc.weight`` and the attention's kinds (``.attn.``).
        kept: :func:`~mergelab.experiments.ch06_pairs.pair_average_keeping` with ``keep=[".attn."]``.
        num_classes: classes (chance is ``1 / num_classes``).
    """
    chance = 1 / num_classes
    best = max(ALIGNED, key=lambda k: methods[k]["accuracy"])
    acc, naive, ends = methods[best]["accuracy"], methods["naive"]["accuracy"], methods["endpoints"]["accuracy"]
    if ends < 2 * chance:  # e.g. the smoke size's one epoch: nothing learnt, nothing for a merge to keep
        return (f"**The ViT.** Its endpoints are themselves near chance at this size ({ends:.1%}; guessing: "
                f"{chance:.0%}), so its merges test nothing here.")
    verdict = ("stays near chance: aligning the residual stream and the MLPs' units does not rescue the average here"
               if acc < 2 * chance else
               f"is {acc / ends:.2f} x the endpoints: aligning the residual stream and the MLPs' units recovers part of "
               "their accuracy" if acc - naive > CLEAR else
               "is not clearly better than the naive average: aligning the residual stream and the MLPs' units does not "
               "help here")
    text = (f"**The ViT.** Its best aligned merge ({best}, {acc:.1%}) {verdict} (guessing: {chance:.0%}; naive "
            f"average: {naive:.1%}; endpoints: {ends:.1%}). ")
    plain, repaired = methods["c2m3"]["accuracy"], methods["c2m3_repair"]["accuracy"]
    if repaired - plain > CLEAR:
        effect = "a clear gain: part of what the merge lost was those units' statistics. "
    elif plain - repaired > CLEAR:
        effect = "a clear loss. "
    elif ends - plain > CLEAR:
        effect = "no clear change: resetting those statistics does not recover what the merge lost. "
    else:
        effect = "no clear change, with little lost to recover. "
    text += (f"REPAIR, which here resets the statistics of the MLPs' hidden units only, moves C²M³ from {plain:.1%} to "
             f"{repaired:.1%}: {effect}")
    attention = [v for k, v in cosine_after.items() if ".attn." in k]
    mlp_in = cosine_after["transformer.resblocks.*.mlp.c_fc.weight"]
    where = f"cosine {min(attention):.2f} to {max(attention):.2f} after matching, against {mlp_in:.2f} for the MLPs' `c_fc`"
    text += (f"The attention's weights, whose inner units the spec leaves in place, stay nearly unrelated ({where}), so "
             "every merge averages unrelated attention maps. " if max(attention) < min(0.2, mlp_in / 2) else
             f"The attention's weights match less well than the MLPs' ({where}). " if max(attention) < mlp_in else
             f"The attention's weights match as well as the MLPs' ({where}). ")
    a, avg, keeping = kept["model_a"], kept["aligned_average"], kept["keeping"]
    text += f"Averaging the first two models after matching gives {avg:.1%} against the first model's {a:.1%}; "
    if a - avg <= CLEAR:
        text += f"that loses little, and keeping the first model's attention instead gives {keeping:.1%}. "
    elif keeping - avg <= CLEAR:
        text += (f"keeping the first model's attention ({kept['kept']:.0f} tensors) and averaging the rest gives "
                 f"{keeping:.1%}, no clear gain: the loss is not in the attention alone. ")
    elif keeping >= a - CLEAR:
        text += (f"keeping the first model's attention ({kept['kept']:.0f} tensors) and averaging the rest gives "
                 f"{keeping:.1%}: the averaged attention is where the loss is. ")
    else:
        text += (f"keeping the first model's attention ({kept['kept']:.0f} tensors) and averaging the rest gives "
                 f"{keeping:.1%}: averaging the attention costs {(keeping - avg) / (a - avg):.0%} of what the average "
                 "loses, and the rest is lost with the averaged MLPs and residual stream. ")
    return text + ("Section 2 says why the spec leaves the attention's units in place. Transformers from different "
                   "seeds need alignments this spec does not express (permutations within and across heads) or more "
                   "than permutations (soft alignments such as optimal transport); this chapter implements neither, "
                   "and the C²M³ paper tests no transformer.")
