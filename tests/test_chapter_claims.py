"""The claims logic of chapters 01 and 02 on hand-made tables (mergelab.experiments.ch01_claims, ch02_claims)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mergelab.experiments.ch01_claims import (bound_validity, effects, heterogeneity_effects, slice_differences,
                                              sparsification_differences)
from mergelab.analysis.statistics import mean_ci
from mergelab.experiments.ch01_stability import ExpertGrid
from mergelab.experiments.ch02_claims import gain_over_zero_shot, taylor_regime, taylor_slopes
from mergelab.training import FinetuneConfig


def _grid() -> ExpertGrid:
    base = FinetuneConfig(lr=0.02, batch_size=32, data_fraction=0.5, num_steps=40)
    return ExpertGrid(base, {"lr": (0.01, 0.02, 0.03), "num_steps": (20, 40, 60)}, checkpoints=(20, 40, 60))


def _merges(lr_effect: float, draws: int = 4, seeds: int = 2) -> pd.DataFrame:
    """Homogeneous averaging merges along lr (at 40 steps) and steps (centre lr), plus TIES copies of the
    centre merge whose gap is 0.1 lower; the gap grows by ``lr_effect`` per 0.01 of lr. Draw d is fine-tuned
    with seed ``d % seeds``, as the chapter's plan cycles its seeds."""
    rng = np.random.default_rng(0)
    rows = []
    for d in range(draws):
        offset = rng.normal()
        for lr in (0.01, 0.02, 0.03):
            gap = offset + lr_effect * (lr - 0.01) / 0.01 + 0.01 * rng.normal()
            rows.append({"draw": d, "seed": d % seeds, "kind": "homogeneous", "method": "weight_averaging",
                         "varied": "centre" if lr == 0.02 else "lr", "mean_lr": lr, "mean_num_steps": 40,
                         "gap_vs_pretrained": gap, "test_accuracy": 0.5 - gap / 10, "train_loss": 1.0 + lr})
        for steps in (20, 60):
            rows.append({"draw": d, "seed": d % seeds, "kind": "homogeneous", "method": "weight_averaging",
                         "varied": "num_steps",
                         "mean_lr": 0.02, "mean_num_steps": steps, "gap_vs_pretrained": offset + steps / 100,
                         "test_accuracy": 0.5, "train_loss": 1.0})
        centre = [r for r in rows if r["draw"] == d and r["varied"] == "centre"][0]
        rows.append({**centre, "method": "ties", "gap_vs_pretrained": centre["gap_vs_pretrained"] - 0.1})
    return pd.DataFrame(rows)


def test_slice_differences_pair_the_top_and_bottom_levels_within_each_draw():
    grid = _grid()
    merges = _merges(lr_effect=0.5)
    lr = slice_differences(merges, grid, "lr", "gap_vs_pretrained")
    assert list(lr["draw"]) == [0, 1, 2, 3] and set(lr["low"]) == {0.01} and set(lr["high"]) == {0.03}
    assert list(lr["seed"]) == [0, 1, 0, 1]
    assert np.allclose(lr["difference"], 1.0, atol=0.05)  # 2 x 0.5, the draw offsets cancel
    steps = slice_differences(merges, grid, "num_steps", "gap_vs_pretrained")  # past the centre: 60 - 40
    assert set(steps["low"]) == {40} and set(steps["high"]) == {60}
    with pytest.raises(ValueError, match="hyperparameter='batch_size'"):
        slice_differences(merges, grid, "batch_size", "gap_vs_pretrained")


def test_effects_give_intervals_over_seeds_and_sparsification_is_paired():
    grid = _grid()
    eff = effects(_merges(lr_effect=0.5, draws=6, seeds=3), grid, ["ties"])
    gap = eff["lr:gap_vs_pretrained"]
    # the draws of one seed share experts: the interval is over the 3 seeds, not the 6 draws
    assert (gap["n"], gap["rows"], len(gap["per_draw"])) == (3, 6, 6)
    assert 0 < gap["ci_low"] <= gap["estimate"] <= gap["ci_high"]
    per_seed = pd.DataFrame(gap["per_draw"]).groupby("seed")["difference"].mean()
    assert gap["estimate"] == pytest.approx(per_seed.mean())
    one_seed = effects(_merges(lr_effect=0.5, draws=4, seeds=1), grid)["lr:gap_vs_pretrained"]
    assert one_seed["n"] == 1 and np.isnan(one_seed["ci_low"]) and np.isnan(one_seed["ci_high"])  # no replication
    null = effects(_merges(lr_effect=0.0), grid)["lr:gap_vs_pretrained"]
    assert null["ci_low"] < 0 < null["ci_high"]
    ties = sparsification_differences(_merges(0.5), grid, "ties", "gap_vs_pretrained")
    assert np.allclose(ties["difference"], -0.1) and set(ties["pairs"]) == {1}
    assert list(ties["seed"]) == [0, 1, 0, 1]
    assert effects(_merges(0.5), grid, ["ties"])["ties:gap_vs_pretrained"]["n"] == 2
    with pytest.raises(ValueError, match="method='dare'"):
        sparsification_differences(_merges(0.5), grid, "dare", "gap_vs_pretrained")


def test_heterogeneity_effects_are_differences_averaged_per_seed_with_t_over_seeds():
    rows = []
    for draw, (seed, d_gap) in enumerate([(0, 0.10), (1, 0.30), (2, 0.20), (0, 0.50), (1, 0.30), (2, 0.20)]):
        rows.append({"draw": draw, "seed": seed, "hyperparameter": "lr", "gap_homogeneous": 1.0,
                     "gap_heterogeneous": 1.0 + d_gap, "test_acc_homogeneous": 0.6, "test_acc_heterogeneous": 0.5})
    out = heterogeneity_effects(pd.DataFrame(rows))["lr"]
    # seed means .3, .3, .2: the draws of seed 0 (.1 and .5) count once
    assert out["gap"]["estimate"] == pytest.approx(0.8 / 3) and (out["gap"]["n"], out["gap"]["rows"]) == (3, 6)
    assert out["gap"]["ci_low"] == pytest.approx(mean_ci([0.3, 0.3, 0.2])["ci_low"])
    assert out["test_accuracy"]["estimate"] == pytest.approx(-0.1)


def test_bound_validity_reads_the_gap_intervals():
    table = pd.DataFrame({"bound": [1.0, 2.0], "gap_vs_pretrained_ci_low": [0.1, 0.2], "gap_vs_pretrained_ci_high": [0.5, 0.6]})
    assert bound_validity(table, "bound")["status"] == "reproduced"
    assert bound_validity(table.assign(bound=[0.3, 2.0]), "bound")["status"] == "not_testable"
    assert bound_validity(table.assign(bound=[0.05, 2.0]), "bound")["status"] == "not_reproduced"


def test_gain_over_zero_shot_is_a_share_of_the_converged_gain():
    zs = {"a": 0.2, "b": 0.4, "c": 0.3, "d": 0.5}
    conv = {"a": 0.8, "b": 0.9, "c": 0.7, "d": 0.9}
    half = {t: zs[t] + (conv[t] - zs[t]) / 2 for t in zs}
    g = gain_over_zero_shot(half, conv, zs)
    assert g["estimate"] == pytest.approx(0.5) and g["ci_low"] <= 0.5 <= g["ci_high"]
    assert g["converged_gain"] == pytest.approx(np.mean([0.6, 0.5, 0.4, 0.4]))
    assert gain_over_zero_shot(zs, conv, zs)["estimate"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same tasks"):
        gain_over_zero_shot({"a": 0.5}, conv, zs)


def test_taylor_slopes_use_only_the_learning_rates_inside_the_regime_and_above_rounding():
    rows = []
    for task, lam in (("a", 10.0), ("b", 20.0), ("c", 15.0), ("d", 12.0)):
        for lr in (1e-3, 3e-3, 1e-2, 3e-1):
            gap, res = 5 * lr * (1.0 + 0.01 * lam), (30 * lr**2 if lr < 0.1 else 1.0)
            if task == "d":  # a gradient so small that four steps leave only rounding: any slope would do
                gap, res = 0.02 / lr**0.5, 0.02 / lr**0.5
            rows.append({"task": task, "lr": lr, "steps": 1, "relative_gap": 0.0, "relative_residual": 0.0,
                         "gap_norm": 1e-6, "residual_norm": 1e-6})  # one step: the gap is rounding alone
            rows.append({"task": task, "lr": lr, "steps": 4, "relative_gap": gap, "relative_residual": res,
                         "gap_norm": 2e-6 if task == "d" else gap, "residual_norm": 2e-6 if task == "d" else res})
    regime = taylor_regime(pd.DataFrame(rows), {"a": 10.0, "b": 20.0, "c": 15.0, "d": 12.0})
    assert regime["eta_lambda_k"].iloc[0] == pytest.approx(1e-3 * 10 * 4) and set(regime["steps"]) == {4}
    assert regime["floor"].tolist() == [1e-6] * 16
    assert regime.loc[regime.task == "d", "gap_above_floor"].tolist() == [False] * 4
    slopes = taylor_slopes(regime)
    assert slopes["in_regime"]["learning_rates"] == [1e-3, 3e-3, 1e-2]
    assert slopes["in_regime"]["gap"]["estimate"] == pytest.approx(1.0) and slopes["in_regime"]["gap"]["n"] == 3
    assert slopes["in_regime"]["residual"]["estimate"] == pytest.approx(2.0)
    assert slopes["in_regime"]["at_rounding_floor"]["gap"] == [["d", 1e-3], ["d", 3e-3], ["d", 1e-2]]
    assert slopes["all"]["residual"]["estimate"] < 1.9  # the run outside the regime bends the slope
    with_d = taylor_slopes(regime.assign(gap_above_floor=True))  # counted, task d would pull the slope to 1/2
    assert with_d["in_regime"]["gap"]["estimate"] == pytest.approx((3 * 1.0 - 0.5) / 4)


def test_the_merging_claim_needs_experts_that_learnt_and_a_gain_surely_over_half():
    """Chapter 02's merging claim on hand-made accuracies: with one-epoch experts that learnt their tasks, a merge
    that keeps about .8 of the converged merge's gain over zero-shot reads reproduced, one that keeps about .2 reads
    not reproduced; with experts that had not learnt (their own gain ratio not surely above .5) both read not
    testable, whatever the merge. The smoke book never reaches the first branch, so only this test reads it."""
    from mergelab.experiments.ch02_claims import MOST, claims

    tasks = ("a", "b", "c", "d", "e", "f")
    rng = np.random.default_rng(0)
    zs = {t: 0.2 + 0.05 * rng.random() for t in tasks}
    conv = {t: 0.8 + 0.05 * rng.random() for t in tasks}

    def keeping(share: float) -> dict:
        return {"per_task_accuracy": {t: zs[t] + share * (conv[t] - zs[t]) + 0.01 * rng.normal() for t in tasks}}

    results = {"one_step_exactness": {"float64": {"per_task": {t: {"relative_error": 1e-16} for t in tasks},
                                                  "gradient_step": {"machine_epsilon": 2.2e-16},
                                                  "task_arithmetic": {"relative_error": 1e-16}}},
               "zero_shot": {"per_task_accuracy": zs},
               "merged_converged": {"task_arithmetic": {"per_task_accuracy": conv},
                                    "weight_averaging": {"per_task_accuracy": conv}},
               "merged_accuracy_by_epochs": {"adamw": {"task_arithmetic": {"1": keeping(0.8)},
                                                       "weight_averaging": {"1": keeping(0.2)}}}}
    slopes = {"in_regime": {"learning_rates": [], "gap": {}, "residual": {}}, "limit": 0.1,
              "all": {"gap": {}, "residual": {}}}

    def statuses(expert_ratio: dict) -> dict:
        out = claims(results, pd.DataFrame(), slopes, 4, "tiny", {"adamw": {"1": expert_ratio}}, {})
        return {c["claim"].split("(")[-1]: c["status"] for c in out if c["claim"].startswith("Merging experts after")}

    learnt = {"estimate": 0.9, "ci_low": 0.8, "ci_high": 0.95}
    assert statuses(learnt) == {"task_arithmetic, adamw).": "reproduced", "weight_averaging, adamw).": "not_reproduced"}
    for unready in ({"estimate": 0.6, "ci_low": MOST - 0.05, "ci_high": 0.7},
                    {"estimate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}):
        assert set(statuses(unready).values()) == {"not_testable"}
