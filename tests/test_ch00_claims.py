"""Chapter 00's claims: each judged on the per-seed values with the three statuses chapters 01-03 use."""

from __future__ import annotations

import pytest

from mergelab.analysis.statistics import both, seed_status
from mergelab.experiments.ch00_benchmark import claims, summarize_seeds


@pytest.mark.parametrize("values, margin, status", [
    ([0.50, 0.51, 0.49], 0.40, "reproduced"),      # mean .10 above, SD .01: clear
    ([0.30, 0.31, 0.29], 0.40, "not_reproduced"),  # mean .10 below: clear
    ([0.971, 0.963, 0.971], 0.97, "not_testable"),  # mean .968, SD .0046: the spread straddles .97
    ([0.98], 0.97, "reproduced"),                   # one seed: the value alone decides
    ([0.96], 0.97, "not_reproduced"),
])
def test_seed_status_weighs_the_mean_against_twice_the_spread(values, margin, status):
    assert seed_status(values, margin) == status


def test_seed_status_refuses_no_values_and_nan():
    for bad in ([], [0.5, float("nan")]):
        with pytest.raises(ValueError, match="values=.*one finite value per draw"):
            seed_status(bad)


def test_a_claim_of_two_parts_is_as_weak_as_its_weakest_part():
    assert both("reproduced", "reproduced") == "reproduced"
    assert both("reproduced", "not_testable") == "not_testable"
    assert both("not_testable", "not_reproduced") == "not_reproduced"


def _rows(zs, wa, ta, tsvm, tsvc, experts=0.8):
    row = lambda a, n=None: {"absolute_accuracy": a, "normalized_accuracy": a / experts if n is None else n}
    return {"zero_shot": row(zs), "weight_averaging": row(wa), "task_arithmetic": row(ta),
            "tsv_merge_validated": row(tsvm), "tsv_compress": row(experts * tsvc, tsvc), "experts": row(experts)}


def _study(per_seed, off=(0.0, 0.0, 0.0)):
    """A seed study of ``per_seed`` rows whose cross-task matrices' off-diagonal means are ``off`` (one per seed)."""
    return {"per_seed": per_seed, "summary": summarize_seeds(per_seed), "cross_coefficient": 0.3,
            "cross_task_off_diagonal": {s: {"mean": m, "min": m - 0.04} for s, m in zip(per_seed, off)}}


def test_chapter_claims_on_a_seed_study_where_tsv_c_straddles_its_threshold():
    per_seed = {"0": _rows(.32, .42, .47, .54, .971), "1": _rows(.32, .42, .48, .53, .963),
                "2": _rows(.32, .43, .47, .54, .971)}
    out = {c["claim"].split(" (")[0].rstrip("."): c for c in claims(_study(per_seed), "tiny")}
    assert out["Task arithmetic beats zero-shot by a wide margin"]["status"] == "reproduced"
    assert out["Weight averaging lies between zero-shot and task arithmetic"]["status"] == "reproduced"
    assert out["TSV-M beats task arithmetic"]["status"] == "reproduced"
    tsvc = out["TSV-C with the task known keeps at least 97 % of the experts' accuracy"]
    assert tsvc["status"] == "not_testable" and tsvc["evidence"]["threshold"] == 0.97
    assert out["Every merge stays below the experts"]["status"] == "reproduced"
    # judged per seed, paired: a merge that reaches the experts on one seed of three leaves it undecided, on every
    # seed contradicts it (the mean of the means alone said "below" for the first)
    for reached, status in (({"1"}, "not_testable"), ({"0", "1", "2"}, "not_reproduced")):
        moved = {s: {**r, "task_arithmetic": {**r["task_arithmetic"], "absolute_accuracy": 0.85 if s in reached else
                                              r["task_arithmetic"]["absolute_accuracy"]}} for s, r in per_seed.items()}
        got = claims(_study(moved), "tiny")
        below = next(c for c in got if c["claim"].startswith("Every merge stays below"))
        assert below["status"] == status and below["evidence"]["experts_minus_merge"]["task_arithmetic"]["seeds"] == 3
    # a seed that moves TSV-C clearly below .97 makes the claim not reproduced, clearly above reproduced
    for value, status in ((0.90, "not_reproduced"), (0.995, "reproduced")):
        moved = {s: _rows(.32, .42, .47, .54, value) for s in "012"}
        got = claims(_study(moved), "tiny")
        assert next(c for c in got if c["claim"].startswith("TSV-C"))["status"] == status


def test_margin_paragraph_says_which_curves_are_straight_and_where_gains_cross():
    from mergelab.experiments.ch00_benchmark import margin_paragraph, value_span

    def row(gap, median, gained=0.5):
        return {"max_gap": abs(gap), "largest_gap": gap, "crossing_median": median, "gained": gained}

    straight = {"a": row(0.04, 0.2), "b": row(-0.06, 0.6)}
    text = margin_paragraph(straight, {"a": 0.5, "b": 0.2})
    assert text.startswith("Along its own vector every task's network is close to linear on this run: the measured "
                           "curve stays within 6 accuracy points")
    assert "by alpha = 0.3 on a; on b their median lies at 0.60." in text
    assert text.endswith("the curves keep 20% to 50% of the experts' gains over zero-shot at alpha = 0.3 (least: b).")
    bent = margin_paragraph({"a": row(0.04, 0.2), "b": row(-0.25, 0.8), "c": row(0.0, float("nan"), gained=0.0)},
                            {"a": 0.5, "b": float("nan"), "c": float("nan")})
    assert "close to linear for a, c on this run" in bent and "but not for b (up to 25 points below it)" in bent
    assert "on b their median lies at 0.80" in bent and bent.endswith("keep 50% of the experts' gains over zero-shot "
                                                                      "at alpha = 0.3.")
    none = margin_paragraph({"a": row(0.0, float("nan"), gained=0.0)}, {"a": float("nan")})
    assert "No expert gains an example" in none and "Measured" not in none
    assert value_span([0.123, 0.1234], ".2f") == "0.12" and value_span([0.1, 0.3], ".1f") == "0.1 to 0.3"


def test_the_margins_of_chapter_00s_claims_are_the_ones_they_state():
    """Task arithmetic at least 10 points above zero-shot, TSV-M at least 3 above task arithmetic, and the cross-task
    entries at least -3 points on average: a merge just above its rival by less than the margin does not pass."""
    def statuses(zs, ta, tsvm, off_mean):
        per_seed = {s: _rows(zs, (zs + ta) / 2, ta + d, tsvm + d, .98) for s, d in zip("012", (0.0, 0.002, -0.002))}
        got = claims(_study(per_seed, (off_mean,) * 3), "tiny")
        return {c["claim"].split(" (")[0].split(":")[0].rstrip("."): c["status"] for c in got}

    clear = statuses(.32, .47, .54, -0.01)
    assert clear["Task arithmetic beats zero-shot by a wide margin"] == "reproduced"
    assert clear["TSV-M beats task arithmetic"] == "reproduced"
    assert clear["Fine-tuned task vectors are weight-disentangled"] == "reproduced"
    short = statuses(.32, .38, .49, -0.05)  # +.06 over zero-shot, +.11 over task arithmetic, -.05 off the diagonal
    assert short["Task arithmetic beats zero-shot by a wide margin"] == "not_reproduced"
    assert short["Fine-tuned task vectors are weight-disentangled"] == "not_reproduced"
    close = statuses(.32, .47, .48, -0.01)  # TSV-M only .01 above task arithmetic, against a margin of .03
    assert close["TSV-M beats task arithmetic"] == "not_reproduced"


def test_weight_disentanglement_is_judged_on_each_seeds_cross_task_mean():
    """Three seeds' off-diagonal means decide against the -3 point margin with their spread, and the claim names
    the coefficient the study added the other vectors at."""
    per_seed = {s: _rows(.32, .40, .47, .54, .98) for s in "012"}

    def judged(means, coefficient=0.3):
        study = {**_study(per_seed, means), "cross_coefficient": coefficient}
        return next(c for c in claims(study, "tiny") if "weight-disentangled" in c["claim"])

    clear = judged([0.004, -0.002, 0.001])
    assert clear["status"] == "reproduced" and "adding 0.3 of another task's vector" in clear["claim"]
    assert clear["evidence"]["seeds"] == 3 and clear["evidence"]["per_seed"] == {"0": 0.004, "1": -0.002, "2": 0.001}
    assert clear["evidence"]["mean_off_diagonal_change"] == pytest.approx(0.001)
    assert clear["evidence"]["worst"] == pytest.approx(-0.042) and clear["evidence"]["coefficient"] == 0.3
    assert "adding 0.5 of another" in judged([0.004, -0.002, 0.001], 0.5)["claim"]
    # mean -.02, above the margin, but a seed at -.05 makes the spread straddle it: this size cannot decide
    assert judged([0.0, -0.05, -0.01])["status"] == "not_testable"
    assert judged([-0.05, -0.06, -0.055])["status"] == "not_reproduced"
    assert judged([float("nan")] * 3)["status"] == "not_testable"  # one task: no pair of tasks to average


def test_the_summary_names_the_larger_of_reach_and_interference():
    from mergelab.experiments.ch00_benchmark import merge_limit

    experts = {"a": 0.9, "b": 0.8}
    reach = {"a": {"alone": 0.5, "others": -0.01}, "b": {"alone": 0.5, "others": 0.02}}  # 35 points short, +0.5 given
    assert merge_limit(reach, experts) == (
        "how far each task's own vector reaches: at this coefficient a vector alone stays 35.0 points below its "
        "expert on average, while the other vectors together give 0.5 points")
    crowded = {"a": {"alone": 0.85, "others": -0.2}, "b": {"alone": 0.75, "others": -0.1}}  # 5 short, 15 taken
    assert merge_limit(crowded, experts) == (
        "what the other tasks' vectors do: together they take 15.0 points from a task on average, more than the "
        "5.0 by which a task's own vector alone stays below its expert")
