"""What the MASS routing notebook promises in its results JSON (smoke profile)."""

from __future__ import annotations

import statistics

import pytest

NAME = "04_mass_routing"
pytestmark = [pytest.mark.notebook, pytest.mark.timeout(900)]


def test_every_method_has_absolute_and_normalized_accuracy(results):
    methods = results["methods"]
    assert set(methods) == {"zero_shot", "task_arithmetic", "tsv_merge", "tsv_merge_validated", "mass",
                            "mass_validated_selection", "mass_official_scoring", "mass_oracle_head", "tsv_compress",
                            "experts"}
    for name, m in methods.items():
        assert set(m["per_task_accuracy"]) == set(results["tasks"]), name
        assert all(0 <= a <= 1 for a in m["per_task_accuracy"].values()), name
        assert m["absolute_accuracy"] == pytest.approx(sum(m["per_task_accuracy"].values()) / len(results["tasks"]))
    assert methods["experts"]["normalized_accuracy"] == pytest.approx(1.0)
    assert methods["tsv_merge"]["coefficient"] == 1.0


def test_mass_with_the_selection_chosen_on_validation_is_the_studys_best(results, params):
    """The row chosen on validation runs at the selection the ablation found best there (the first of equals), and
    at the defaults it is MASS itself."""
    chosen = results["methods"]["mass_validated_selection"]
    study = [a for a in results["ablations"] if a["study"] == "selection" and a["normalized_accuracy"] is not None]
    best = max(study, key=lambda a: a["normalized_accuracy"])
    assert (chosen["threshold"], chosen["top_k"]) == (best["threshold"], best["top_k"])
    assert chosen["top_k"] in params["ablation_top_k"] and chosen["threshold"] in params["ablation_thresholds"]
    if (chosen["threshold"], chosen["top_k"]) == (params["threshold"], params["top_k"]):
        assert chosen["per_task_accuracy"] == results["methods"]["mass"]["per_task_accuracy"]


def test_the_official_scoring_counts_at_least_what_mass_counts(results):
    """The official code's scoring reads the same predictions and also counts another task's head whose index is the
    label, so it is at least MASS's figure task by task."""
    mass, official = results["methods"]["mass"], results["methods"]["mass_official_scoring"]
    assert all(official["per_task_accuracy"][t] >= a for t, a in mass["per_task_accuracy"].items())


def test_a_wrong_head_never_scores_better_than_the_true_head(results):
    """MASS counts a prediction with another task's head as wrong, so its accuracy is at most the
    oracle head's on the same second-pass features, task by task."""
    mass, oracle = results["methods"]["mass"], results["methods"]["mass_oracle_head"]
    share_true_head = results["routing"]["head_is_true"]
    for t in results["tasks"]:
        assert mass["per_task_accuracy"][t] <= oracle["per_task_accuracy"][t] + 1e-12, t
    assert mass["absolute_accuracy"] <= share_true_head + 1e-12


def test_routing_accuracy_confusion_and_selected_sets(results, params):
    routing, tasks = results["routing"], results["tasks"]
    assert results["routing_accuracy"] == routing["contains_true"]
    assert 0 <= routing["argmax_true"] <= routing["contains_true"] <= 1  # the argmax is always selected
    # the true head needs the true task selected: its share of all inputs is its share when selected times that
    assert routing["head_is_true"] == pytest.approx(routing["head_is_true_when_selected"] * routing["contains_true"])
    assert set(routing["other_head_share"]) == set(tasks)  # every input read with a wrong head is counted once
    assert sum(routing["other_head_share"].values()) == pytest.approx(1 - routing["head_is_true"])
    assert 1 <= routing["mean_selected"] <= params["top_k"]
    assert sum(routing["selected_size_share"].values()) == pytest.approx(1.0)
    assert {int(k) for k in routing["selected_size_share"]} <= set(range(1, params["top_k"] + 1))
    conf = results["confusion"]
    assert conf["tasks"] == tasks
    for i, t in enumerate(tasks):
        assert sum(conf["argmax"][i]) == pytest.approx(1.0) and sum(conf["head"][i]) == pytest.approx(1.0)
        assert all(h <= s + 1e-9 for h, s in zip(conf["head"][i], conf["selected"][i]))  # the head is a selected task's
        assert conf["selected"][i][i] == pytest.approx(routing["per_task_contains_true"][t])
        assert 1 - 1e-9 <= sum(conf["selected"][i]) <= params["top_k"] + 1e-9
    assert len(results["examples"]) == params["example_inputs"]  # the figure's inputs, all of them
    for e in results["examples"]:
        assert set(e["residuals"]) == set(tasks) and sum(e["weights"].values()) == pytest.approx(1.0)
        assert e["head"] in e["selected"]


def test_storage_timing_and_cache(results, params):
    s = results["storage"]
    assert results["storage_multiple"] == pytest.approx(s["total_bytes"] / s["model_bytes"])
    assert results["storage_multiple"] > 1
    assert s["total_bytes"] == s["model_bytes"] + s["factor_bytes"] + s["dense_bytes"]
    # a module the experts' recipe freezes is stored once, in theta_0 (its task vectors are zero); nothing else is
    assert s["unchanged"] == [f"{m}.weight" for m in params["finetune"].get("frozen", [])]
    # with every tensor stored per task (as if the experts had trained the frozen ones too): more, or the same
    if s["unchanged"]:
        assert results["storage_multiple_all_trained"] > results["storage_multiple"]
    else:
        assert results["storage_multiple_all_trained"] == pytest.approx(results["storage_multiple"])
    claim = next(c for c in results["claims"] if c["claim"].startswith("MASS stores"))
    assert claim["evidence"]["unchanged_stored_once"] == s["unchanged"]
    t = results["timing"]
    assert len(t["ratios"]) == t["repeats"] == params["timing_repeats"] >= 3
    assert results["time_per_image_ratio"] == t["ratio"] == pytest.approx(statistics.median(t["ratios"]))
    assert t["ratio_interval"]["ci_low"] <= t["ratio"] <= t["ratio_interval"]["ci_high"]  # three rounds: an interval
    assert t["mass_s"] > 0 and t["mass_cold_s"] > 0 and t["first_pass_s"] > 0
    assert t["first_pass_ratio"] == pytest.approx(statistics.median(t["first_pass_ratios"]))
    assert t["second_pass_ratio"] == pytest.approx(statistics.median([a - b for a, b in zip(t["ratios"], t["first_pass_ratios"])]))
    assert 1 <= t["second_pass_sets"] <= t["batch"]
    assert t["batch"] == params["batch_size"] and t["threads"] >= 1
    assert results["second_pass_models_built"] >= 1
    assert results["routing_block"] == 1 and results["num_blocks"] == 2  # depth 0.75 of 2 blocks


def test_ablations_cover_every_block_matrix_threshold_and_top_k(results, params):
    rows = results["ablations"]
    layer = [r for r in rows if r["study"] == "layer"]
    assert {(r["block"], r["routing_matrix"]) for r in layer} == {(b, m) for b in range(2) for m in params["ablation_matrices"]}
    sel = [r for r in rows if r["study"] == "selection"]
    assert {(r["threshold"], r["top_k"]) for r in sel} == {(th, k) for th in params["ablation_thresholds"]
                                                           for k in params["ablation_top_k"]}
    assert all(r["mean_selected"] == 1 for r in sel if r["top_k"] == 1)
    first = [r for r in rows if r["study"] == "first_pass"]
    assert {r["first_pass"] for r in first} == {"pretrained"} and len(first) == 2
    for r in rows:
        assert 0 <= r["absolute_accuracy"] <= 1 and 0 <= r["argmax_true"] <= r["contains_true"] <= 1


def test_claims_table(results):
    claims = results["claims"]
    # every claim is made at this size, the two that need ablation rows (routing on the TSV-M first pass against
    # the pretrained one; top-k 2 or 3 against 1) included: they are left out only where the rows are missing
    texts = [c["claim"] for c in claims]
    assert len(claims) == 7, texts
    assert any(t.startswith("Routing on the TSV-M first pass beats routing on the pretrained model") for t in texts)
    assert any(t.startswith("Selecting up to 2 or 3 tasks beats routing to one") for t in texts)
    for c in claims:
        assert set(c) == {"claim", "source", "status", "evidence"}
        assert c["status"] in {"reproduced", "not_reproduced", "not_testable"}
        assert c["source"] == "mass2026"


def test_routing_finds_the_task_far_more_often_than_chance(results):
    """The science the chapter rests on, at a size where it holds (smoke: routing .85 with about two tasks
    selected of four, argmax .51): the selected set holds the true task far more often than a random set
    of the same size would (``mean_selected / T``), and the argmax is the true task far above ``1 / T``.
    A router that reads the wrong token, the wrong matrix or random residuals falls to chance."""
    routing, T = results["routing"], len(results["tasks"])
    assert results["routing_accuracy"] >= routing["mean_selected"] / T + 0.2, routing
    assert routing["argmax_true"] >= 1 / T + 0.15, routing


def test_the_overlap_table_and_the_accuracy_budget_follow_from_the_run(results):
    """The overlap table has a row and a column per task, shares in [0, 1]; the budget's three parts are the
    differences of the stored rows and add up to the experts' lead over MASS."""
    tasks, overlap = results["tasks"], results["subspace_overlap"]
    assert set(overlap) == set(tasks) and all(set(row) == set(tasks) for row in overlap.values())  # JSON sorts keys
    assert all(-1e-6 <= v <= 1 + 1e-6 for row in overlap.values() for v in row.values())
    n = {m: results["methods"][m]["normalized_accuracy"] for m in ("experts", "tsv_compress", "mass_oracle_head", "mass")}
    budget = results["accuracy_budget"]
    assert budget["compression"] == pytest.approx(n["experts"] - n["tsv_compress"])
    assert budget["routing"] == pytest.approx(n["tsv_compress"] - n["mass_oracle_head"])
    assert budget["head_choice"] == pytest.approx(n["mass_oracle_head"] - n["mass"])
    assert budget["compression"] + budget["routing"] + budget["head_choice"] == pytest.approx(budget["total"])
    assert budget["head_choice"] >= -1e-12  # MASS is at most MASS with the true head (test above)
