"""What the stability-bound notebook promises in its results JSON (smoke parameters)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import spearmanr

from conftest import NOTEBOOKS  # noqa: F401  (the notebook must exist to be collected there too)
from mergelab import report

NAME = "01_stability_bound"
HYPERPARAMETERS = ("lr", "batch_size", "data_fraction", "num_steps")


@pytest.fixture(scope="module")
def params():
    return report.profile_params("smoke", NAME)


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_grid_merges_and_correlations_are_recorded(run_notebook, params):
    results = run_notebook(NAME)
    # the grid: one run per recipe and task, every checkpoint cached
    n_recipes = 1 + sum(len(v) - 1 for k, v in params["levels"].items() if k != "num_steps")
    assert results["experts"]["runs"] == n_recipes * len(params["task_pool"])
    assert results["experts"]["checkpoints"] == results["experts"]["runs"] * len(params["checkpoints"])

    # the merges: per draw, homogeneous (recipes x checkpoints), heterogeneous (one per hyperparameter),
    # and the centre + heterogeneous merges again per sparsifying method
    per_draw = n_recipes * len(params["checkpoints"]) + 4 + len(params["sparsify"]) * (1 + 4)
    merges = results["merges"]
    assert len(merges) == params["num_draws"] * per_draw
    for m in merges:
        assert m["generalization_gap"] == pytest.approx(m["test_loss"] - m["train_loss"])
        assert len(m["tasks"].split("+")) == params["merge_size"]
        if m["method"] == "weight_averaging":
            for regime in ("quadratic", "smooth"):
                assert m[f"bound_{regime}"] > 0
                assert m[f"sampling_{regime}"] >= 0 and m[f"drift_{regime}"] >= 0
        else:
            assert m["bound_quadratic"] is None  # the bound is derived for plain averaging only
    hetero = [m for m in merges if m["kind"] == "heterogeneous" and m["method"] == "weight_averaging"]
    centre = params["centre"]
    for m in hetero:  # equal mean hyperparameters to the centre merge
        for h in HYPERPARAMETERS:
            assert m[f"mean_{h}"] == pytest.approx(centre[h])


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_constants_and_rank_correlations(run_notebook, params):
    results = run_notebook(NAME)
    consts = results["constants"]
    assert {r["task"] for r in consts["curvature"]} == set(params["curvature_tasks"])
    assert all(b > 0 for b in consts["beta_schedule"]["beta"])
    assert all(p["gradient_norm_mean"] > 0 for p in consts["gradient_norm_probes"])
    assert consts["lipschitz_mean"] > 0
    for regime in ("quadratic", "smooth"):
        corr = results["rank_correlation"][regime]
        assert set(corr) == {"overall", *HYPERPARAMETERS}
        n_avg = sum(m["method"] == "weight_averaging" for m in results["merges"])
        assert corr["overall"]["n"] == n_avg
        # the reported correlation is the one of the merges table (None in JSON where it is undefined)
        avg = [m for m in results["merges"] if m["method"] == "weight_averaging"
               and isinstance(m.get(f"bound_{regime}"), float) and math.isfinite(m[f"bound_{regime}"])]
        per_seed = []  # the merges of one fine-tuning seed share experts: a rho per seed, averaged over the seeds
        for seed in sorted({m["seed"] for m in avg}):
            x = [m[f"bound_{regime}"] for m in avg if m["seed"] == seed]
            y = [m["gap_vs_pretrained"] for m in avg if m["seed"] == seed]
            if len(x) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
                per_seed.append(spearmanr(x, y).statistic)
        rho = corr["overall"]["spearman"]
        assert corr["overall"]["seeds"] == len(per_seed)
        if per_seed:
            assert rho == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-9)
        else:
            assert rho is None or math.isnan(rho)
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average_start"]) == 3


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_every_gap_and_correlation_has_an_interval_and_claims_follow_from_them(run_notebook, params):
    results = run_notebook(NAME)

    def inside(est, lo, hi):
        return lo <= est + 1e-12 and est - 1e-12 <= hi

    # every measured gap (merges and single experts) with a sampling interval around it
    for row in results["merges"] + results["experts_by_lr"]:
        assert inside(row["gap_vs_pretrained"], row["gap_vs_pretrained_ci_low"], row["gap_vs_pretrained_ci_high"])
        assert row["gap_vs_pretrained_ci_high"] > row["gap_vs_pretrained_ci_low"]
    for row in results["merges"]:
        assert inside(row["generalization_gap"], row["generalization_gap_ci_low"], row["generalization_gap_ci_high"])
    for row in results["experts_by_lr"]:  # the bound on single experts (K = 1)
        assert row["bound"] > 0 and row["lipschitz"] > 0
    # rank correlations overall and within draws, each with an interval over seeds where there are two or more
    for regime in ("quadratic", "smooth"):
        for part in results["rank_correlation"][regime].values():
            for est, lo, hi in ((part["spearman"], part["ci_low"], part["ci_high"]),
                                (part["spearman_within_draw"], part["within_draw_ci_low"], part["within_draw_ci_high"])):
                assert part["seeds"] <= len(params["seeds"])
                if part["seeds"] >= 2:  # an interval over the seeds that have a correlation
                    assert lo is not None and not math.isnan(lo) and -1 <= lo <= hi <= 1 and inside(est, lo, hi)
                else:  # one seed (the smoke size's): no interval, and none pretended
                    assert all(v is None or math.isnan(v) for v in (lo, hi)), (regime, part)
    # effects: t intervals over the fine-tuning seeds (draws that share a seed share experts), none with one seed
    for name, eff in results["effects"].items():
        assert eff["rows"] == len(eff["per_draw"]) <= params["num_draws"]
        assert eff["n"] == len({r["seed"] for r in eff["per_draw"]}) <= len(params["seeds"])
        if eff["n"] >= 2:
            assert inside(eff["estimate"], eff["ci_low"], eff["ci_high"]), name
        else:
            assert eff["ci_low"] is None or math.isnan(eff["ci_low"])
    # heterogeneous minus homogeneous merges, per spread hyperparameter, with intervals over the seeds
    spread = {r["hyperparameter"] for r in results["heterogeneity"] if r["method"] == "weight_averaging"}
    assert set(results["heterogeneity_effects"]) == spread
    for e in results["heterogeneity_effects"].values():
        assert e["gap"]["n"] <= len(params["seeds"]) and e["gap"]["rows"] >= e["gap"]["n"]
    # the claims: one per direction (gap and accuracy) per hyperparameter, the optimization term, each
    # sparsifying method, the bound's ranking (merges, K = 1) and its validity (merges, K = 1)
    claims = results["claims"]
    assert len(claims) == 2 * len(HYPERPARAMETERS) + 1 + len(params["sparsify"]) + 4
    for c in claims:
        assert set(c) == {"claim", "source", "status", "evidence"}
        assert c["status"] in ("reproduced", "not_reproduced", "not_testable")
        assert c["source"] == "li2026generalization" and c["evidence"]["size"] == params["benchmark"]
        ci = c["evidence"]
        if "ci_low" in ci and (ci["ci_low"] is None or math.isnan(ci["ci_low"])):
            assert c["status"] == "not_testable"  # no status from a point estimate
    for method in params["sparsify"]:
        assert any(method in c["claim"] for c in claims)


def test_parameter_files_match_the_notebook_defaults():
    """params/tiny is the notebook's parameters cell; tiny_full reuses the tiny benchmark's caches."""
    import json

    from mergelab import paths

    nb = json.loads((paths.notebooks_dir() / f"{NAME}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    defaults: dict = {}
    exec("".join(cell["source"]), {}, defaults)  # literals only
    tiny = report.profile_params("tiny", NAME)
    assert defaults == tiny
    full = report.profile_params("tiny_full", NAME)
    for key in ("data", "model", "pretrain", "head_shots", "tasks"):
        assert full[key] == tiny[key], key
    for profile in (tiny, full):  # fine-tuning processes x torch threads fit the 2-core reference machine
        assert profile["workers"] * profile["threads"] <= 2
