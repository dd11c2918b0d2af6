"""Confidence intervals and claim statuses (mergelab.analysis.statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mergelab.analysis.statistics import (
    band_status,
    accuracy_difference_ci,
    bootstrap_ci,
    claim,
    decimals_for,
    directional_status,
    format_ci,
    mean_gap_ci,
    mean_ci,
    spearman_by_group_ci,
    spearman_ci,
)


def test_spearman_interval_contains_the_estimate_and_separates_a_strong_relation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    strong = spearman_ci(x, x + 0.3 * rng.normal(size=60))
    assert strong["ci_low"] <= strong["estimate"] <= strong["ci_high"]
    assert strong["ci_low"] > 0.7 and directional_status(strong) == "reproduced"
    unrelated = spearman_ci(x, rng.normal(size=60))
    assert unrelated["ci_low"] < 0 < unrelated["ci_high"]
    assert directional_status(unrelated) == "not_testable"
    reversed_ = spearman_ci(x, -x + 0.3 * rng.normal(size=60))
    assert directional_status(reversed_) == "not_reproduced"
    assert directional_status(reversed_, predicted="negative") == "reproduced"


def test_intervals_are_seeded_and_narrow_with_more_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    y = x + rng.normal(size=400)
    assert spearman_ci(x, y, seed=3) == spearman_ci(x, y, seed=3)
    other = spearman_ci(x, y, seed=4)  # the seed drives the bootstrap: another seed, other bounds
    assert (other["ci_low"], other["ci_high"]) != (spearman_ci(x, y, seed=3)["ci_low"], spearman_ci(x, y, seed=3)["ci_high"])
    small = spearman_ci(x[:30], y[:30])
    large = spearman_ci(x, y)
    assert large["ci_high"] - large["ci_low"] < small["ci_high"] - small["ci_low"]


def test_too_few_rows_or_constant_columns_give_undefined_bounds_and_not_testable():
    few = spearman_ci([1.0, 2.0], [2.0, 1.0])
    assert np.isnan(few["ci_low"]) and directional_status(few) == "not_testable"
    constant = spearman_ci([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    assert np.isnan(constant["estimate"]) and directional_status(constant) == "not_testable"
    nan_rows = spearman_ci([1.0, np.nan, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert nan_rows["n"] == 4


def test_a_grouped_mean_is_over_the_groups_not_the_rows():
    v, g = [1.0, 1.0, 1.0, 4.0, 5.0, np.nan], ["a", "a", "a", "b", "c", "c"]
    out = mean_ci(v, groups=g)
    # group means 1, 4, 5: three units (the repeated "a" rows count once), t over them
    assert out["estimate"] == pytest.approx(10 / 3) and (out["n"], out["rows"]) == (3, 5)
    assert out["ci_low"] == pytest.approx(mean_ci([1.0, 4.0, 5.0])["ci_low"])
    single = mean_ci([0.1, 0.2, 0.3], groups=[7, 7, 7])  # one independent unit: no interval
    assert single["n"] == 1 and single["estimate"] == pytest.approx(0.2) and np.isnan(single["ci_low"])
    with pytest.raises(ValueError, match="one label per value"):
        mean_ci([1.0, 2.0], groups=["a"])


def test_spearman_by_group_averages_each_groups_rho():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    groups = np.repeat([0, 1, 2], 10)
    y = x + rng.normal(size=30) + 10 * groups  # the groups' offsets must not enter: each rho on its own rows
    out = spearman_by_group_ci(x, y, groups)
    per = {k: spearmanr(x[groups == k], y[groups == k]).statistic for k in range(3)}
    assert out["groups"] == 3 and out["n"] == 30
    assert out["per_group"] == pytest.approx(per) and out["estimate"] == pytest.approx(np.mean(list(per.values())))
    t = mean_ci(list(per.values()))  # Student's t over the groups, cut to [-1, 1]
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((max(t["ci_low"], -1), min(t["ci_high"], 1)))
    assert t["ci_high"] > 1 and out["ci_high"] == 1.0
    assert spearman_ci(x, y)["estimate"] < out["estimate"] - 0.3  # pooled, the groups' offsets hide the relation
    # opposite signs in different groups: the interval over groups is wide, whatever the rows' number
    mixed = spearman_by_group_ci(x, np.where(groups == 1, -x, x), groups)
    assert directional_status(mixed) == "not_testable"
    # a group at rho = 1 (a few rows can be, by chance) weighs as much as any other, and the bounds stay in [-1, 1]
    ones = spearman_by_group_ci([1.0, 2, 3, 1, 2, 3, 1, 2, 3], [1.0, 2, 3, 1, 3, 2, 3, 1, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert ones["estimate"] == pytest.approx((1.0 + 0.5 - 0.5) / 3) and -1 <= ones["ci_low"] <= ones["ci_high"] <= 1
    # one group: its rho, no interval; a group under 3 rows or constant is left out
    one = spearman_by_group_ci(x[:10], x[:10], np.zeros(10))
    assert one["estimate"] == pytest.approx(1.0) and one["groups"] == 1 and np.isnan(one["ci_low"])
    short = spearman_by_group_ci([1.0, 2.0, 3.0, 1.0, 2.0], [1.0, 2.0, 3.0, 5.0, 4.0], [0, 0, 0, 1, 1])
    assert short["groups"] == 1 and np.isnan(short["ci_high"])
    with pytest.raises(ValueError, match="same length"):
        spearman_by_group_ci([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0])


def test_a_cluster_bootstrap_resamples_whole_groups():
    import itertools

    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    # five groups of eight rows; within a group x and y are unrelated, between groups their means move together
    groups = np.repeat(np.arange(5), 8)
    level = rng.normal(size=5)[groups]
    x, y = level + 0.3 * rng.normal(size=40), level + 0.3 * rng.normal(size=40)
    clustered = spearman_ci(x, y, groups=groups, n_resamples=20000)
    assert clustered["estimate"] == spearman_ci(x, y)["estimate"] and clustered["groups"] == 5
    # the exact bootstrap distribution: every ordered draw of 5 of the 5 groups, equally likely
    exact = []
    for drawn in itertools.product(range(5), repeat=5):
        rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
        exact.append(spearmanr(x[rows], y[rows]).statistic)
    lo, hi = np.nanpercentile(exact, [2.5, 97.5])
    assert (clustered["ci_low"], clustered["ci_high"]) == pytest.approx((lo, hi), abs=0.02)
    assert clustered == spearman_ci(x, y, groups=groups, n_resamples=20000)  # seeded
    few = spearman_ci(x[:24], y[:24], groups=groups[:24])  # three groups: too few resamples to trust
    assert np.isfinite(few["estimate"]) and np.isnan(few["ci_low"]) and few["groups"] == 3
    assert np.isfinite(spearman_ci(x[:24], y[:24], groups=groups[:24], min_groups=3)["ci_low"])
    with pytest.raises(ValueError, match="one label per row"):
        spearman_ci(x, y, groups=groups[:-1])
    with pytest.raises(ValueError, match="min_groups=1 is not valid"):
        spearman_ci(x, y, groups=groups, min_groups=1)


def test_mean_interval_is_students_t():
    v = [0.10, 0.12, 0.14]
    ci = mean_ci(v)
    half = 4.302652729911275 * np.std(v, ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert ci["estimate"] == pytest.approx(0.12)
    assert ci["ci_low"] == pytest.approx(0.12 - half) and ci["ci_high"] == pytest.approx(0.12 + half)
    assert directional_status(ci, margin=0.05) == "reproduced"
    assert directional_status(ci, margin=0.15) == "not_testable"  # the interval straddles the margin
    assert directional_status(ci, margin=0.2) == "not_reproduced"  # positive, but surely short of the claimed margin
    assert np.isnan(mean_ci([0.3])["ci_low"])


def test_bootstrap_of_a_mean_agrees_with_the_normal_interval():
    rng = np.random.default_rng(2)
    v = rng.normal(1.0, 2.0, size=500)
    ci = bootstrap_ci(np.mean, v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))
    assert ci["ci_low"] == pytest.approx(v.mean() - half, abs=0.05)
    assert ci["ci_high"] == pytest.approx(v.mean() + half, abs=0.05)


def test_accuracy_difference_interval_from_binomial_errors():
    a, b = {"x": 0.8, "y": 0.6}, {"x": 0.7, "y": 0.6}
    ci = accuracy_difference_ci(a, b, 1000)
    se = np.sqrt((0.8 * 0.2 + 0.7 * 0.3 + 2 * 0.6 * 0.4) / 1000) / 2
    assert ci["estimate"] == pytest.approx(0.05)
    assert ci["ci_high"] - ci["estimate"] == pytest.approx(1.959963984540054 * se)
    assert directional_status(ci) == "reproduced"
    assert directional_status(accuracy_difference_ci(a, b, 20)) == "not_testable"


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="same tasks"):
        accuracy_difference_ci({"x": 0.5}, {"y": 0.5}, 10)
    with pytest.raises(ValueError, match="n_examples"):
        accuracy_difference_ci({"x": 0.5}, {"x": 0.5}, 0)
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci(np.mean, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="status"):
        claim("c", "src", "maybe", {})
    with pytest.raises(ValueError, match="predicted"):
        directional_status({"ci_low": 0.1, "ci_high": 0.2}, predicted="up")


def test_vectorized_spearman_equals_scipys():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 5, size=40).astype(float), rng.normal(size=40)  # ties in x
    assert spearman_ci(x, y)["estimate"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_gap_interval_covers_the_true_gap_at_its_level():
    """The normal interval of a mean-over-tasks gap from per-example losses has its nominal coverage."""
    rng = np.random.default_rng(4)
    hits, runs = 0, 400
    for _ in range(runs):
        train = {"a": rng.exponential(2.0, 80), "b": rng.exponential(1.0, 50)}
        test = {"a": rng.exponential(2.5, 60), "b": rng.exponential(1.0, 70)}  # true gap (0.5 + 0) / 2
        ci = mean_gap_ci(train, test)
        assert ci["ci_low"] <= ci["estimate"] <= ci["ci_high"]
        hits += ci["ci_low"] <= 0.25 <= ci["ci_high"]
    assert 0.91 <= hits / runs <= 0.98
    exact = mean_gap_ci({"a": [1.0, 3.0]}, {"a": [2.0, 6.0]})
    assert exact["estimate"] == pytest.approx(2.0)
    half = 1.959964 * np.sqrt(8.0 / 2 + 2.0 / 2)  # var(test) = 8, var(train) = 2, two examples each
    assert exact["ci_high"] - exact["estimate"] == pytest.approx(half, rel=1e-5)
    with pytest.raises(ValueError, match="same tasks"):
        mean_gap_ci({"a": [1, 2]}, {"b": [1, 2]})
    with pytest.raises(ValueError, match="fewer than 2"):
        mean_gap_ci({"a": [1.0]}, {"a": [1.0, 2.0]})


def test_numbers_are_rounded_to_what_their_interval_supports():
    assert decimals_for(0.034) == 3 and decimals_for(2.6) == 1 and decimals_for(140.0) == 0
    assert decimals_for(float("nan")) == 3
    text = format_ci({"estimate": 0.01234, "ci_low": -0.02, "ci_high": 0.045}, 100, " points")
    assert text == "+1.2 [-2.0, +4.5] points"
    level = format_ci({"estimate": 0.96256, "ci_low": 0.95669, "ci_high": 0.96842}, 100, " %", signed=False)
    assert level == "96.26 [95.67, 96.84] %"  # a level, not a difference: no signs
    assert "no interval" in format_ci({"estimate": 0.5, "ci_low": float("nan"), "ci_high": float("nan")})


def test_band_status_needs_the_whole_interval_inside_or_outside():
    def iv(lo, hi):
        return {"estimate": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}

    assert band_status(iv(0.9, 1.1), 0.7, 1.3) == "reproduced"
    assert band_status(iv(0.5, 1.1), 0.7, 1.3) == "not_testable"
    assert band_status(iv(1.5, 2.1), 0.7, 1.3) == "not_reproduced"
    assert band_status(iv(float("nan"), float("nan")), 0.7, 1.3) == "not_testable"
    with pytest.raises(ValueError, match="low <= high"):
        band_status(iv(0, 1), 2, 1)


def test_normalized_difference_ci_estimate_and_binomial_width():
    from mergelab.analysis.statistics import normalized_difference_ci

    experts = {"a": 0.8, "b": 0.5}
    acc, other = {"a": 0.6, "b": 0.4}, {"a": 0.4, "b": 0.4}
    one = normalized_difference_ci(acc, None, experts, 100)
    assert one["estimate"] == pytest.approx((0.6 / 0.8 + 0.4 / 0.5) / 2)
    var = (0.6 * 0.4 / 100 / 0.8 ** 2 + 0.4 * 0.6 / 100 / 0.5 ** 2) / 4
    assert one["ci_high"] - one["estimate"] == pytest.approx(1.959964 * math.sqrt(var), rel=1e-5)
    two = normalized_difference_ci(acc, other, experts, {"a": 100, "b": 400})
    assert two["estimate"] == pytest.approx((0.2 / 0.8) / 2) and two["n"] == 500
    wide, narrow = (normalized_difference_ci(acc, other, experts, n) for n in (50, 5000))
    assert wide["ci_high"] - wide["ci_low"] > 9 * (narrow["ci_high"] - narrow["ci_low"])  # 1 / sqrt(n)
    undefined = normalized_difference_ci(acc, other, {"a": 0.8, "b": 0.0}, 100)
    assert math.isnan(undefined["ci_low"]) and math.isnan(undefined["estimate"])
    with pytest.raises(ValueError, match="must cover the same tasks"):
        normalized_difference_ci(acc, {"a": 0.5}, experts, 100)
    with pytest.raises(ValueError, match="n_examples=0 is not valid"):
        normalized_difference_ci(acc, None, experts, 0)
    with pytest.raises(ValueError, match="must cover the same tasks"):  # experts of other tasks altogether
        normalized_difference_ci(acc, None, {"c": 0.8, "d": 0.5}, 100)
    with pytest.raises(ValueError, match=r"n_examples=10.0 is not valid; give one integer"):
        normalized_difference_ci(acc, None, experts, 10.0)
    with pytest.raises(ValueError, match=r"n_examples=\{'a': 100\} is not valid; .*a count for each of \['a', 'b'\]"):
        normalized_difference_ci(acc, None, experts, {"a": 100})


def test_proportion_ci_is_wilsons_interval():
    from mergelab.analysis.statistics import proportion_ci

    ci = proportion_ci(932, 1000)
    assert ci["estimate"] == pytest.approx(0.932) and ci["ci_low"] < 0.932 < ci["ci_high"]
    z = 1.959963985
    centre = (0.932 + z * z / 2000) / (1 + z * z / 1000)
    half = z / (1 + z * z / 1000) * math.sqrt(0.932 * 0.068 / 1000 + z * z / 4e6)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((centre - half, centre + half), rel=1e-6)
    assert proportion_ci(10, 10)["ci_high"] == pytest.approx(1.0) and proportion_ci(0, 10)["ci_low"] == pytest.approx(0.0)
    for bad in ((11, 10), (-1, 10), (1, 0), (0.5, 10)):
        with pytest.raises(ValueError, match="is not valid"):
            proportion_ci(*bad)


def test_paired_table_counts_agreement_and_refuses_bad_inputs():
    from mergelab.analysis.statistics import paired_table

    a = np.array([True, True, False, False, True])
    b = np.array([True, False, True, False, True])
    assert paired_table(a, b) == {"both": 2, "a_only": 1, "b_only": 1, "neither": 1}
    with pytest.raises(ValueError, match=r"correct_a and correct_b must be non-empty 1-D boolean arrays of one length"):
        paired_table(a, b[:3])
    with pytest.raises(ValueError, match=r"boolean"):
        paired_table(a.astype(int), b)


def test_paired_normalized_interval_matches_a_paired_bootstrap_and_is_narrower_than_the_unpaired_one():
    from mergelab.analysis.statistics import normalized_difference_ci, paired_normalized_ci, paired_table

    rng = np.random.default_rng(3)
    expert, model, tables = {}, {}, {}
    for t in range(6):
        e = rng.random(800) < 0.6 + 0.05 * t
        c = np.where(rng.random(800) < 0.93, e, rng.random(800) < 0.5)  # agrees with the expert on most images
        expert[t], model[t], tables[t] = e, c, paired_table(c, e)
    ci = paired_normalized_ci(tables)
    ratios = [model[t].mean() / expert[t].mean() for t in tables]
    assert ci["estimate"] == pytest.approx(np.mean(ratios)) and ci["n"] == 6 * 800
    boots = []
    for _ in range(2000):  # resample each task's images, the same ones for both models
        idx = {t: rng.integers(0, 800, 800) for t in tables}
        boots.append(np.mean([model[t][idx[t]].mean() / expert[t][idx[t]].mean() for t in tables]))
    half = (ci["ci_high"] - ci["ci_low"]) / 2
    assert half / 1.96 == pytest.approx(np.std(boots), rel=0.1)
    unpaired = normalized_difference_ci({t: model[t].mean() for t in tables}, None,
                                        {t: expert[t].mean() for t in tables}, 800)
    assert half < 0.6 * (unpaired["ci_high"] - unpaired["ci_low"]) / 2
    assert paired_normalized_ci(dict(reversed(tables.items()))) == ci  # to the bit, whatever order a file lists tasks in
    same = paired_normalized_ci({t: paired_table(expert[t], expert[t]) for t in tables})  # the expert against itself
    assert same["estimate"] == pytest.approx(1.0) and same["ci_low"] == pytest.approx(1.0)
    assert same["ci_high"] == pytest.approx(1.0)


def test_paired_normalized_interval_is_undefined_without_a_right_expert_and_refuses_bad_tables():
    from mergelab.analysis.statistics import paired_normalized_ci

    zero = paired_normalized_ci({"a": {"both": 0, "a_only": 3, "b_only": 0, "neither": 7},
                                 "b": {"both": 5, "a_only": 0, "b_only": 1, "neither": 4}})
    assert np.isnan(zero["ci_low"]) and np.isnan(zero["ci_high"])
    with pytest.raises(ValueError, match=r"tables\['a'\]=.* is not valid; use a paired_table"):
        paired_normalized_ci({"a": {"both": 1, "a_only": 2}})
    with pytest.raises(ValueError, match=r"tables\['a'\]=.* is not valid"):
        paired_normalized_ci({"a": {"both": -1, "a_only": 2, "b_only": 0, "neither": 1}})
    with pytest.raises(ValueError, match="tables is empty"):
        paired_normalized_ci({})
    with pytest.raises(ValueError, match=r"tables\['a'\]=.* counts no examples"):
        paired_normalized_ci({"a": {"both": 0, "a_only": 0, "b_only": 0, "neither": 0}})


def test_a_percentile_interval_never_leaves_the_bootstrap_replicates_range():
    # four timing ratios whose percentile interval of the median came out one rounding above the largest
    ratios = [2.788939789183474, 5.232547007254272, 3.9553841445170397, 5.954781333471279]
    ci = bootstrap_ci(np.median, ratios, vectorized=True)
    assert min(ratios) <= ci["ci_low"] <= ci["estimate"] <= ci["ci_high"] <= max(ratios)
    assert ci["ci_high"] == max(ratios)


def test_the_claims_table_shows_every_claim_in_full():
    """Claims that differ only after their 50th character must not read alike in the book (a DataFrame's
    display would cut them there)."""
    from mergelab.analysis.statistics import claims_table

    stem = "Merging experts after 1 epoch retains most (over half) of the converged merge's gain"
    claims = [{"claim": f"{stem} (task_arithmetic)", "source": "s", "status": "reproduced", "evidence": {}},
              {"claim": f"{stem} (tsv_merge)", "source": "s", "status": "not_testable", "evidence": {}}]
    table = claims_table(claims)
    html = table._repr_html_()  # what a notebook and the book show
    assert f"{stem} (task_arithmetic)" in html and f"{stem} (tsv_merge)" in html
    assert list(table.data.columns) == ["claim", "source", "status"]
    assert table.data["status"].tolist() == ["reproduced", "not_testable"]


def test_a_negative_prediction_is_the_positive_one_mirrored():
    def iv(lo: float, hi: float) -> dict:
        return {"estimate": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}

    for lo, hi in [(-0.5, 0.2), (-0.5, -0.1), (0.1, 0.5), (-0.2, 0.5), (-0.05, -0.01)]:
        for margin in (0.0, 0.03):
            assert directional_status(iv(lo, hi), "negative", margin) == directional_status(iv(-hi, -lo), "positive", margin)
    assert directional_status(iv(-0.5, 0.2), "negative") == "not_testable"  # straddles 0
    assert directional_status(iv(0.1, 0.5), "negative") == "not_reproduced"
    assert directional_status(iv(-0.5, -0.1), "negative", margin=0.2) == "not_testable"  # not below -margin
    assert directional_status(iv(-0.5, -0.3), "negative", margin=0.2) == "reproduced"
    assert directional_status(iv(-0.15, -0.05), "negative", margin=0.2) == "not_reproduced"  # surely short of it


def test_paired_normalized_interval_is_the_delta_method_on_the_examples():
    from mergelab.analysis.statistics import paired_normalized_ci

    # per task: model right on `a`, expert right on `e`, one example per row, the model at ~0.6 of the expert
    rng = np.random.default_rng(5)
    tables, ratios, variances = {}, [], []
    for task, n in (("x", 120), ("y", 300)):
        e = rng.random(n) < 0.8
        a = np.where(e, rng.random(n) < 0.6, rng.random(n) < 0.1)
        tables[task] = {"both": int((a & e).sum()), "a_only": int((a & ~e).sum()), "b_only": int((~a & e).sum()),
                        "neither": int((~a & ~e).sum())}
        r = a.mean() / e.mean()
        ratios.append(r)
        variances.append(np.var(a - r * e, ddof=1) / (n * e.mean() ** 2))  # the delta method, from the rows
    out = paired_normalized_ci(tables)
    assert out["estimate"] == pytest.approx(np.mean(ratios), abs=1e-12)
    half = 1.959963984540054 * np.sqrt(sum(variances)) / 2
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((np.mean(ratios) - half, np.mean(ratios) + half), abs=1e-12)
