"""What the task-vectors-as-gradients notebook promises in its results JSON (smoke parameters)."""

from __future__ import annotations

import pytest

from mergelab import report

NAME = "02_task_vectors_as_gradients"


@pytest.fixture(scope="module")
def results(run_notebook):
    return run_notebook(NAME)


@pytest.fixture(scope="module")
def params():
    return report.profile_params("smoke", NAME)


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_one_step_identity_holds_to_float_precision(results, params):
    one = results["one_step_exactness"]
    assert set(one) == set(params["one_step_dtypes"])
    for dtype, res in one.items():
        eps = res["gradient_step"]["machine_epsilon"]
        assert set(res["per_task"]) == set(results["tasks"])
        for task, r in res["per_task"].items():
            # rounding only: at most a few thousand epsilons relative to the update
            assert 0 <= r["relative_error"] < 5000 * eps, (dtype, task)
            assert r["update_norm"] > 0
        assert res["task_arithmetic"]["relative_error"] < 5000 * eps
        assert res["gradient_step"]["relative_error"] < 5000 * eps
    if {"float32", "float64"} <= set(one):
        worst = {dt: max(r["relative_error"] for r in one[dt]["per_task"].values()) for dt in ("float32", "float64")}
        assert worst["float64"] < 1e-6 * worst["float32"]


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_per_epoch_cosines_cover_every_run_and_small_sgd_steps_follow_the_gradient(results, params):
    rows = results["per_epoch_cosines"]
    expected = {(opt, float(lr), task, e) for opt, lrs in params["learning_rates"].items() for lr in lrs
                for task in results["tasks"] for e in range(1, params["epochs"] + 1)}
    assert {(r["optimizer"], r["lr"], r["task"], r["epoch"]) for r in rows} == expected
    for r in rows:
        assert -1 - 1e-9 <= r["cosine"] <= 1 + 1e-9
        assert r["norm_ratio"] > 0
        if r["epoch"] == 1:
            assert r["first_epoch_share"] == pytest.approx(1.0)
    # the smallest SGD learning rate, first epoch: one pass of small steps is -eta k grad L(theta_0)
    lr0 = min(params["learning_rates"]["sgd"])
    first = [r for r in rows if r["optimizer"] == "sgd" and r["lr"] == lr0 and r["epoch"] == 1]
    assert all(r["cosine"] > 0.95 for r in first)
    assert all(r["norm_ratio"] == pytest.approx(1.0, abs=0.05) for r in first)
    means = results["per_epoch_cosine_mean"]
    assert set(means) == set(params["learning_rates"])
    assert all(len(v) == params["epochs"] for by_lr in means.values() for v in by_lr.values())


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_second_order_term_explains_most_of_the_gap_at_small_learning_rate(results, params):
    rows = [r for r in results["taylor_gap"] if r["steps"] > 1]
    assert {r["lr"] for r in rows} == {float(x) for x in params["gd_learning_rates"]}
    lr0 = min(params["gd_learning_rates"])
    small = [r for r in rows if r["lr"] == lr0]
    assert all(r["relative_residual"] < 0.5 * r["relative_gap"] for r in small)
    assert all(r["gap_cosine"] > 0.8 for r in small)


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_merged_accuracy_per_number_of_epochs_and_references(results, params):
    epochs = [str(e) for e in params["merge_epochs"]]
    methods = results["merge_methods"]
    assert "task_arithmetic" in methods
    assert methods == params["merge_methods"]  # every method ran (TSV-M included)
    merged_tasks = results["merge_tasks"]  # section 4 merges these tasks' experts, not necessarily sections 1-3's
    assert merged_tasks == params["merge_tasks"] and set(results["converged_expert_accuracy"]) == set(merged_tasks)
    assert set(merged_tasks) != set(results["tasks"])  # the smoke profile runs section 4 on a list of its own
    assert set(results["merged_accuracy_by_epochs"]) == set(params["merge_learning_rates"])
    rows = [r for by_method in results["merged_accuracy_by_epochs"].values() for m in methods
            for r in by_method[m].values()]
    assert len(rows) == len(params["merge_learning_rates"]) * len(methods) * len(epochs)
    assert all(set(by_method[m]) == set(epochs) for by_method in results["merged_accuracy_by_epochs"].values()
               for m in methods)
    rows += [results["merged_converged"][m] for m in methods]
    for r in rows:
        assert set(r["per_task_accuracy"]) == set(merged_tasks)
        assert r["absolute_accuracy"] == pytest.approx(sum(r["per_task_accuracy"].values()) / len(merged_tasks))
        assert r["coefficient"] in [float(c) for c in params["coefficient_grid"]]
        assert r["validation_sweep"][str(r["coefficient"])] == max(r["validation_sweep"].values())
    for opt in params["merge_learning_rates"]:
        mt = results["multitask_same_budget"][opt]
        # the budget of the merged experts' trajectories (their own batch size and data share)
        assert [mt[e]["num_steps"] for e in epochs] == [int(e) * results["merge_steps_per_epoch"] for e in epochs]
        assert set(results["experts_by_epochs"][opt]) == set(epochs)
        for e in epochs:
            cmp = results["sum_vs_multitask"][opt][e]
            assert cmp["relative_distance"] >= 0 and -1 - 1e-9 <= cmp["cosine"] <= 1 + 1e-9
            assert 0 <= cmp["sum_accuracy"] <= 1
    # normalized accuracy is relative to the converged experts
    conv = results["converged_expert_accuracy"]
    r = results["merged_converged"]["task_arithmetic"]
    assert r["normalized_accuracy"] == pytest.approx(
        sum(r["per_task_accuracy"][t] / conv[t] for t in conv) / len(conv))
    assert results["trajectory_seconds_per_step"] > 0


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_layer_cosines_are_per_layer_group_and_task(results):
    tables = results["layer_cosines_last_epoch"]
    assert len(tables) == len(results["merge_learning_rates"])
    for table in tables.values():
        assert set(table) == set(results["tasks"])
        for by_group in table.values():
            assert {"embedding", "block0.attn", "block0.mlp", "output"} <= set(by_group)
            assert all(-1 - 1e-9 <= v <= 1 + 1e-9 for v in by_group.values())


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_gains_over_zero_shot_regime_and_claims(results, params):
    import math

    def inside(iv):
        return iv["ci_low"] - 1e-9 <= iv["estimate"] <= iv["ci_high"] + 1e-9

    # an epoch of the merged trajectories: floor(n * merge_data_fraction / merge_batch_size) steps
    assert results["merge_batch_size"] == params["merge_batch_size"]
    assert results["merge_steps_per_epoch"] >= 1
    zs = results["zero_shot"]["absolute_accuracy"]
    gains = results["gain_over_zero_shot"]
    for opt, by_method in gains["merged"].items():
        for m, by_e in by_method.items():
            assert set(by_e) == {str(e) for e in params["merge_epochs"]}
            for e, g in by_e.items():
                acc = results["merged_accuracy_by_epochs"][opt][m][e]["absolute_accuracy"]
                conv = results["merged_converged"][m]["absolute_accuracy"]
                assert g["gain"] == pytest.approx(acc - zs) and g["converged_gain"] == pytest.approx(conv - zs)
                if conv != zs:
                    assert g["estimate"] == pytest.approx((acc - zs) / (conv - zs))
                if all(g[k] is not None and math.isfinite(g[k]) for k in ("estimate", "ci_low", "ci_high")):
                    assert inside(g)
                else:  # an undefined interval is undefined at both ends
                    assert all(g[k] is None or math.isnan(g[k]) for k in ("ci_low", "ci_high"))
    # the Taylor regime: eta * lambda_max * k per task and learning rate, slopes with intervals
    lam = results["taylor_lambda_max"]
    assert set(lam) == set(results["tasks"]) and all(v > 0 for v in lam.values())
    for r in results["taylor_regime"]:
        assert r["eta_lambda_k"] == pytest.approx(r["lr"] * lam[r["task"]] * r["steps"])
    for part in ("in_regime", "all"):
        for q in ("gap", "residual"):
            iv = results["taylor_slopes"][part][q]
            if iv["ci_low"] is not None and not math.isnan(iv["ci_low"]):
                assert inside(iv)
    # the claims
    claims = results["claims"]
    assert len(claims) == 2 + 3 * len(params["merge_learning_rates"]) + len(params["merge_learning_rates"]) * len(
        results["merge_methods"]) + 2
    for c in claims:
        assert set(c) == {"claim", "source", "status", "evidence"}
        assert c["status"] in ("reproduced", "not_reproduced", "not_testable")
        assert c["source"] == "zhou2025gradients" and c["evidence"]["size"] == params["benchmark"]
        ev = c["evidence"]
        if "ci_low" in ev and (ev["ci_low"] is None or math.isnan(ev["ci_low"])):
            assert c["status"] == "not_testable"  # no status from a point estimate
    # the one-step identity is exact to rounding (the test above), so its claims are reproduced
    assert [c["status"] for c in claims[:2]] == ["reproduced", "reproduced"]
    # merging early experts cannot be judged when the experts themselves have not learned their tasks
    for c in claims:
        if c["claim"].startswith("Merging experts after") and not c["evidence"]["experts_ready"]:
            assert c["status"] == "not_testable"


def test_at_tiny_section_4_merges_chapter_00s_experts_of_every_task():
    """The merging claims are judged over tasks, so tiny merges all eight (over four their intervals straddle
    the threshold, session 25); the converged experts are chapter 00's, read from its cache."""
    tiny, first = report.profile_params("tiny", NAME), report.profile_params("tiny", "00_benchmark_and_baselines")
    assert sorted(tiny["merge_tasks"]) == sorted(first["tasks"]) and len(tiny["merge_tasks"]) == 8
    assert tiny["finetune"] == first["finetune"]
