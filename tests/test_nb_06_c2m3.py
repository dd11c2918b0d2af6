"""What the cycle-consistent merging notebook promises in its results JSON (smoke profile)."""

from __future__ import annotations

import pytest

from mergelab.experiments.ch06_c2m3 import METHODS

NAME = "06_cycle_consistent_merging"
pytestmark = [pytest.mark.notebook, pytest.mark.timeout(900)]


def test_every_method_and_architecture_has_accuracy_and_loss(results, params):
    archs = results["architectures"]
    assert set(archs) == set(params["architectures"]) == {"mlp", "resnet", "vit"}
    for arch, r in archs.items():
        methods = r["methods"]
        assert {"endpoints", *METHODS} <= set(methods), arch
        for name, m in methods.items():
            assert 0 <= m["accuracy"] <= 1 and m["loss"] > 0, (arch, name)
        ends = [methods[f"endpoint_{i}"]["accuracy"] for i in range(params["merge_models"])]
        assert methods["endpoints"]["accuracy"] == pytest.approx(sum(ends) / len(ends))
        assert methods["c2m3"]["normalized_accuracy"] == pytest.approx(
            methods["c2m3"]["accuracy"] / methods["endpoints"]["accuracy"])


def test_c2m3_maps_are_cycle_consistent_and_permutations_keep_the_function(results):
    for arch, r in results["architectures"].items():
        cyc = r["cycle_errors"]
        assert cyc["c2m3"]["mean"] == 0 and cyc["merge_many"]["mean"] == 0, arch
        assert 0 <= cyc["pairwise"]["mean"] <= 1
        sym = r["permutation_symmetry"]
        assert sym["max_weight_change"] > 0 and sym["max_logit_change"] < 1e-4, arch
        assert sym["accuracy"] == sym["accuracy_permuted"]


def test_frank_wolfe_trace_and_stopping(results, params):
    for arch, r in results["architectures"].items():
        fw = r["frank_wolfe"]
        obj = fw["objective"]
        assert len(obj) == fw["iterations"] + 1 <= params["frank_wolfe"]["max_iter"] + 1
        assert all(b >= a - 1e-9 * abs(a) for a, b in zip(obj, obj[1:])), arch
        assert all(0 <= t <= 1 for t in fw["step_sizes"]) and len(fw["step_sizes"]) == fw["iterations"]
        # the stopping rule: it stops at the first run of `patience` gains below tol * max(1, |f|), else at max_iter
        rule = params["frank_wolfe"]
        small = [b - a < rule["tol"] * max(1.0, abs(a)) for a, b in zip(obj, obj[1:])]
        run, first_stop = 0, None
        for i, is_small in enumerate(small):
            run = run + 1 if is_small else 0
            if run >= rule["patience"] and first_stop is None:
                first_stop = i + 1
        assert fw["converged"] == (first_stop is not None), arch
        assert fw["iterations"] == (first_stop if first_stop is not None else rule["max_iter"]), arch


def test_model_count_study_and_claims(results, params):
    counts = {(r["num_models"], r["method"]) for r in results["model_count"]}
    assert {k for k, _ in counts} == set(params["model_counts"])
    assert {m for _, m in counts} == {"endpoints", *METHODS}
    claims = results["claims"]
    assert claims and all(c["status"] in {"reproduced", "not_reproduced", "not_testable"} for c in claims)
    assert all(c["claim"] and c["source"] and isinstance(c["evidence"], dict) for c in claims)
    cyc = [c for c in claims if "cycle-consistent" in c["claim"]]
    assert len(cyc) == len(params["architectures"])  # one per architecture


def test_the_vit_pair_average_is_measured_with_and_without_its_attention_averaged(results, params):
    kept = results["architectures"]["vit"]["attention_kept"]
    assert kept["kept"] == 4 * params["architectures"]["vit"]["blocks"]  # in_proj and out_proj, weight and bias
    assert all(0 <= kept[k] <= 1 for k in ("model_a", "aligned_average", "keeping"))
    assert "attention_kept" not in results["architectures"]["mlp"]


def test_the_vit_paragraph_is_printed_with_numbers_that_read(results):
    """The paragraph is chosen by the run's numbers (smoke's ViT learns little): never a NaN or a negative share."""
    import json
    import re

    cells = json.load(open(results["_executed_notebook"]))["cells"]
    shown = ["".join(o.get("data", {}).get("text/markdown", "")) for c in cells if c["cell_type"] == "code"
             for o in c.get("outputs", [])]
    paragraph = next(t for t in shown if "**The ViT.**" in t)
    assert "nan" not in paragraph.lower() and not re.search(r"-\d+%", paragraph), paragraph
    vit = results["architectures"]["vit"]["methods"]
    near_chance = vit["endpoints"]["accuracy"] < 0.2  # smoke's one epoch: the paragraph says the merges test nothing
    assert ("test nothing here" in paragraph) == near_chance and ("Section 2 says why" in paragraph) != near_chance


def test_merge_sets_table_matches_the_main_comparison(results, params):
    rows = results["merge_sets"]
    for arch, r in results["architectures"].items():
        mine = [row for row in rows if row["architecture"] == arch]
        assert len(mine) == params["merge_sets"][arch] == r["merge_sets"]["n"], arch
        first = next(row for row in mine if row["models"] == ",".join(map(str, range(params["merge_models"]))))
        paired = r["paired"]["c2m3_repair_vs_merge_many_repair"]
        assert first["difference"] == pytest.approx(paired["difference"]), arch
        assert first["c2m3_repair"] == pytest.approx(r["methods"]["c2m3_repair"]["accuracy"]), arch
        assert (r["merge_sets"]["standard_error"] is None) == (len(mine) < 3), arch


def test_aligned_averaging_of_the_mlps_is_far_above_naive_averaging(results):
    """The chapter's premise where the smoke models learn enough to show it (the MLPs; the smoke ResNets
    stay near chance): averaging the three MLPs after C2M3's alignment is far more accurate than
    averaging them as they are (smoke: .34 against .18). Alignment that did nothing (identity maps) or
    permuted inconsistently would fall to the naive average."""
    m = results["architectures"]["mlp"]["methods"]
    assert m["c2m3"]["accuracy"] >= m["naive"]["accuracy"] + 0.1, {k: v["accuracy"] for k, v in m.items()}
