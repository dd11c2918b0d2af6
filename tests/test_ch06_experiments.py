"""Chapter 06's experiment functions: training every architecture, the merge study (the main comparison,
the model-count study and the comparison across sets of models) and the claim that reads it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mergelab.executors import RunsFailed
from mergelab.experiments import ch06_c2m3 as ch
from mergelab.training.scratch import ScratchConfig, evaluate_state, scratch_artifact

DIGITS = {"test_fraction": 0.25, "split_seed": 0}
ARCHS = {"mlp": {"widths": [8, 8], "epochs": 1, "batch_size": 128, "lr": 3e-3, "optimizer": "adam"},
         "resnet": {"widths": [4, 4], "blocks": 1, "epochs": 1, "batch_size": 128, "lr": 0.05, "optimizer": "sgd"}}
ALL_ARCHS = {**ARCHS, "vit": {"widths": [8], "blocks": 1, "heads": 2, "patch_size": 2, "epochs": 1, "batch_size": 128,
                              "lr": 3e-3, "optimizer": "adam"}}  # the per-architecture tests run on open_clip's ViT too
FW = {"max_iter": 4, "tol": 1e-6, "patience": 2}


def test_merge_sets_start_with_the_main_comparison_and_refuse_bad_counts():
    sets = ch.merge_sets_of(5, 3, 10)
    assert sets[0] == (0, 1, 2) and len(set(sets)) == 10 and all(len(s) == 3 for s in sets)
    assert ch.merge_sets_of(5, 3, 2) == sets[:2]
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"merge_sets=.* is not valid; use 1\.\.10"):
            ch.merge_sets_of(5, 3, bad)


def test_across_sets_summarizes_the_paired_differences_between_sets():
    diffs = [0.02, -0.01, 0.03, 0.0]
    sets = pd.DataFrame({"architecture": ["resnet"] * 4 + ["mlp"], "models": ["0,1,2", "0,1,3", "0,1,4", "0,2,3", "0,1,2"],
                         "difference": [*diffs, 0.5]})
    a = ch.across_sets(sets, "resnet")
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert a["n"] == 4 and a["mean"] == pytest.approx(mean) and a["standard_error"] == pytest.approx(sd / 2)
    assert (a["positive"], a["negative"]) == (2, 1) and a["per_set"]["0,1,3"] == pytest.approx(-0.01)
    assert ch.across_sets(sets, "mlp")["standard_error"] is None  # one set: no spread between sets
    assert a["separated"] is False and ch.sets_separated(a) is False  # mean .01 inside 2 x .0091
    assert ch.across_sets(sets, "mlp")["separated"] is None
    assert ch.sets_separated({**a, "mean": 0.02}) is True
    # both signs: ahead, behind, or inside two standard errors (the chapter's text reads this)
    assert ch.sets_direction(a) == "unresolved" and ch.sets_direction({**a, "mean": 0.02}) == "ahead"
    assert ch.sets_direction({**a, "mean": -0.02}) == "behind" and ch.sets_separated({**a, "mean": -0.02}) is False
    assert ch.sets_direction(ch.across_sets(sets, "mlp")) is None
    assert "objective" not in a  # sets without the alignment objectives: nothing to compare
    # the alignments compared by C2M3's own objective, and whether the better score goes with the better merge
    scored = sets.assign(objective_merge_many=[100.0, 100.0, 200.0, 50.0, 1.0],
                         objective_c2m3=[101.0, 99.0, 204.0, 50.25, 1.0])
    o = ch.across_sets(scored, "resnet")["objective"]
    assert (o["c2m3_higher"], o["merge_many_higher"]) == (3, 1)
    assert o["relative_min"] == pytest.approx(-0.01) and o["relative_max"] == pytest.approx(0.02)
    assert o["spearman_with_difference"] == pytest.approx(1.0)  # relative .01, -.01, .02, .005: the diffs' order
    one = ch.across_sets(scored, "mlp")["objective"]  # one set: counted, but no correlation across sets
    assert (one["c2m3_higher"], one["merge_many_higher"], one["spearman_with_difference"]) == (0, 0, None)


def _resnet_results(sets: dict | None) -> dict:
    methods = {m: {"accuracy": acc} for m, acc in (("endpoints", .98), ("naive", .2), ("merge_many", .8),
                                                  ("merge_many_repair", .93), ("c2m3", .8), ("c2m3_repair", .95))}
    return {"resnet": {"methods": methods, "cycle_errors": {"c2m3": {"mean": 0.0}, "pairwise": {"mean": .9}},
                       "paired": {"c2m3_repair_vs_merge_many_repair": {"difference": .02, "standard_error": .005}},
                       "merge_sets": sets}}


def _repair_claim(arch_results: dict) -> dict:
    (claim,) = [c for c in ch.claims(arch_results) if "above MergeMany with REPAIR" in c["claim"]]
    return claim


def test_the_repair_claim_uses_the_spread_across_sets_when_there_are_several():
    # one set: the first set's paired test (.02 > 2 x .005)
    assert _repair_claim(_resnet_results(None))["status"] == "reproduced"
    # several sets: a mean difference inside two standard errors across sets decides nothing (not testable),
    # whatever the first set says; one below minus two standard errors contradicts the claim
    noisy = {"n": 10, "mean": .001, "standard_error": .003, "positive": 5, "negative": 4, "per_set": {}}
    claim = _repair_claim(_resnet_results(noisy))
    assert claim["status"] == "not_testable" and "10 sets" in claim["claim"]
    assert claim["evidence"]["mean_difference"] == .001 and claim["evidence"]["first_set"]["difference"] == .02
    clear = {**noisy, "mean": .02, "standard_error": .004}
    assert _repair_claim(_resnet_results(clear))["status"] == "reproduced"
    behind = {**noisy, "mean": -.02, "standard_error": .004}
    assert _repair_claim(_resnet_results(behind))["status"] == "not_reproduced"


def test_the_repair_claim_on_one_set_reads_its_paired_difference_both_ways():
    def one_set(difference: float) -> str:
        results = _resnet_results(None)
        results["resnet"]["paired"]["c2m3_repair_vs_merge_many_repair"]["difference"] = difference
        return _repair_claim(results)["status"]

    # standard error .005: over +.01 ahead, under -.01 behind, between them unresolved
    assert (one_set(.02), one_set(.005), one_set(-.005), one_set(-.02)) == (
        "reproduced", "not_testable", "not_testable", "not_reproduced")


def test_train_all_and_merge_study_agree_with_merging_by_hand(data_dir):
    trained = ch.train_all(ARCHS, 3, 0, DIGITS)
    split, key = ch.digits_data(DIGITS)
    for arch, recipe in ARCHS.items():  # every model is in the cache, under the key train_models reads
        assert all(scratch_artifact(ScratchConfig(arch=arch, **recipe, seed=s), key).exists() for s in range(3))
        assert trained[arch].states[0].keys() == ch.train_models(arch, recipe, 3, 0, split, key).states[0].keys()
    study = ch.merge_study(trained, 3, [2, 3], DIGITS, FW, 0, merge_sets={"resnet": 1})
    assert set(study.outcomes) == set(study.metrics) == set(ARCHS)
    assert sorted(set(zip(study.counts.architecture, study.counts.num_models))) == [
        ("mlp", 2), ("mlp", 3), ("resnet", 2), ("resnet", 3)]
    assert list(study.sets.models) == ["0,1,2", "0,1,2"]
    t = trained["resnet"]
    outcome = ch.merge_methods(t, t.states[:2], split, FW, 0)
    by_hand, _ = ch.evaluate_methods(t, outcome, t.states[:2], split)
    two = study.counts[(study.counts.architecture == "resnet") & (study.counts.num_models == 2)].set_index("method")
    for m in ("endpoints", *ch.METHODS):
        assert two.loc[m, "accuracy"] == pytest.approx(by_hand[m]["accuracy"]), m
    main = study.metrics["resnet"]
    row = study.sets[study.sets.architecture == "resnet"].iloc[0]
    diff = ch.paired_difference(study.correct["resnet"]["c2m3_repair"], study.correct["resnet"]["merge_many_repair"])
    assert row["difference"] == pytest.approx(diff["difference"])
    assert row["c2m3_repair"] == pytest.approx(main["c2m3_repair"]["accuracy"])
    # each set's alignment objectives are C2M3's objective at the two methods' maps, the main set's kept ones
    kept = study.outcomes["resnet"]
    assert row["objective_c2m3"] == main["c2m3"]["alignment_objective"] == kept.frank_wolfe.objective_rounded
    assert row["objective_merge_many"] == pytest.approx(ch.objective_at(t.spec, t.states[:3], kept.merge_many))
    assert main["naive"]["alignment_objective"] == pytest.approx(
        ch.objective_at(t.spec, t.states[:3], [ch.identity_permutations(t.spec.group_sizes(t.states[0]))] * 3))
    assert isinstance(study.correct["resnet"]["c2m3"], torch.Tensor)


def test_train_all_refuses_a_vit_recipe_that_does_not_fit_the_images_before_training(data_dir):
    bad = {**ALL_ARCHS["vit"], "patch_size": 3}
    with pytest.raises(ValueError, match=r"patch_size=3 must divide image_size=8"):
        ch.train_all({"mlp": ARCHS["mlp"], "vit": bad}, 2, 0, DIGITS)
    assert not (data_dir / "scratch").exists() or not any((data_dir / "scratch").iterdir())  # nothing trained


def test_vit_reading_states_what_its_numbers_support():
    from mergelab.experiments.ch06_claims import vit_reading

    def methods(naive, aligned, ends=0.96):
        return {"naive": {"accuracy": naive}, "endpoints": {"accuracy": ends},
                **{m: {"accuracy": aligned} for m in ("merge_many", "merge_many_repair", "c2m3", "c2m3_repair")}}

    cos = {"transformer.resblocks.*.attn.in_proj_weight": 0.08, "transformer.resblocks.*.attn.out_proj.weight": 0.09,
           "transformer.resblocks.*.mlp.c_fc.weight": 0.38}
    kept = {"model_a": 0.96, "aligned_average": 0.13, "keeping": 0.53, "kept": 8}
    text = vit_reading(methods(0.10, 0.10), cos, kept, 10)
    assert "stays near chance" in text and "stay nearly unrelated" in text and "costs 48% of what" in text
    assert "recovers part" in vit_reading(methods(0.10, 0.70), cos, kept, 10)
    untrained = vit_reading(methods(0.10, 0.10, ends=0.11), cos, kept, 10)  # endpoints near chance: nothing to test
    assert "endpoints are themselves near chance" in untrained and "stays near chance" not in untrained
    assert "not clearly better than the naive" in vit_reading(methods(0.40, 0.42), cos, kept, 10)
    assert "match as well as the MLPs'" in vit_reading(methods(0.1, 0.1), {**cos, "x.attn.y": 0.5}, kept, 10)
    assert "match less well" in vit_reading(methods(0.1, 0.1), {**cos, "x.attn.y": 0.3}, kept, 10)
    assert "from 10.0% to 10.0%: no clear change: resetting" in text  # REPAIR on the ViT: the merges' margin
    close = vit_reading(methods(0.10, 0.93, ends=0.96), cos, kept, 10)  # nothing much lost: nothing to recover
    assert "no clear change, with little lost" in close and "resetting" not in close
    for repaired, phrase in ((0.30, "from 10.0% to 30.0%: a clear gain"), (0.02, "a clear loss")):
        m = {**methods(0.10, 0.10), "c2m3_repair": {"accuracy": repaired}}
        assert phrase in vit_reading(m, cos, kept, 10)
    for odd, phrase in (({"aligned_average": 0.96, "keeping": 0.96}, "that loses little"),  # nothing lost: no share
                        ({"keeping": 0.10}, "no clear gain"),  # keeping below the average: no negative share
                        ({"keeping": 0.99}, "the averaged attention is where the loss is")):  # above the model: no >100 %
        text = vit_reading(methods(0.1, 0.1), cos, {**kept, **odd}, 10)
        assert phrase in text and "nan" not in text and "costs" not in text, text


def test_merge_study_refuses_bad_parameters_by_name(data_dir):
    trained = ch.train_all(ARCHS, 3, 0, DIGITS)
    with pytest.raises(ValueError, match=r"model_counts=\[2, 4\].*\[4\].*2\.\.num_models=3"):
        ch.merge_study(trained, 3, [2, 4], DIGITS, FW, 0)
    with pytest.raises(ValueError, match=r"merge_sets names \['vit'\]"):
        ch.merge_study(trained, 3, [2], DIGITS, FW, 0, merge_sets={"vit": 2})
    with pytest.raises(ValueError, match=r"merge_sets=2 is not valid; use 1\.\.1"):
        ch.merge_study(trained, 3, [2], DIGITS, FW, 0, merge_sets={"resnet": 2})
    with pytest.raises(ValueError, match=r"seed=1 is not the seed"):
        ch.merge_study(trained, 3, [2], DIGITS, FW, 1)


@pytest.mark.parametrize("arch", sorted(ALL_ARCHS))
def test_repair_from_shared_endpoint_statistics_equals_repair_against_the_permuted_endpoints(arch, data_dir):
    """merge_methods measures each endpoint once and permutes its statistics into every merge's frame;
    that must give what running REPAIR against the permuted endpoints themselves gives."""
    import copy

    from mergelab.alignment import apply_permutation, merge_aligned, merge_many, random_permutations, repair

    t = ch.train_all({arch: ALL_ARCHS[arch]}, 3, 0, DIGITS)[arch]
    split, _ = ch.digits_data(DIGITS)
    g = torch.Generator().manual_seed(1)
    for perms in (merge_many(t.spec, t.states, seed=0),
                  [random_permutations(t.spec.group_sizes(t.states[0]), g) for _ in t.states]):
        merged = merge_aligned(t.spec, t.states, perms)
        shared = ch.repaired(t, merged, t.states, perms, split.X_train, ch.endpoint_stats(t, t.states, split.X_train))
        model = copy.deepcopy(t.model)
        model.load_state_dict(merged)
        ends = []
        for p, s in zip(perms, t.states):
            e = copy.deepcopy(t.model)
            e.load_state_dict(apply_permutation(t.spec, p, s))
            ends.append(e)
        repair(model, ends, split.X_train, names=ch.repair_layers(t))
        for k, v in model.state_dict().items():
            torch.testing.assert_close(shared[k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert any(not torch.equal(shared[k], merged[k]) for k in merged), "REPAIR changed nothing"


def test_merge_jobs_are_cached_by_configuration_and_load_bit_for_bit(data_dir, monkeypatch):
    """A second merge study loads every job from <data>/merges: nothing is merged again, and the numbers,
    the per-example correctness, the merged states and the permutations are the computed ones exactly."""
    trained = ch.train_all(ARCHS, 3, 0, DIGITS)
    first = ch.merge_study(trained, 3, [2, 3], DIGITS, FW, 0, merge_sets={"resnet": 1})
    assert len(list((data_dir / "merges").glob("*.safetensors"))) == 4  # mlp and resnet, 2 and 3 models

    def no_merging(*args, **kwargs):
        raise AssertionError("a cached merge job was merged again")

    monkeypatch.setattr(ch, "merge_methods", no_merging)
    again = ch.merge_study(trained, 3, [2, 3], DIGITS, FW, 0, merge_sets={"resnet": 1})
    pd.testing.assert_frame_equal(first.counts, again.counts)
    pd.testing.assert_frame_equal(first.sets, again.sets)
    assert first.metrics == again.metrics
    for arch in ARCHS:
        a, b = first.outcomes[arch], again.outcomes[arch]
        assert list(a.states) == list(b.states) == list(ch.METHODS)
        for m in ch.METHODS:
            assert list(a.states[m]) == list(b.states[m])
            assert all(torch.equal(a.states[m][k], b.states[m][k]) for k in a.states[m]), m
            assert torch.equal(first.correct[arch][m], again.correct[arch][m])
        for x, y in ((a.frank_wolfe.perms, b.frank_wolfe.perms), (a.merge_many, b.merge_many)):
            assert [list(p) for p in x] == [list(p) for p in y]
            assert all(torch.equal(p[g], q[g]) for p, q in zip(x, y) for g in p)
        assert (a.frank_wolfe.objective, a.frank_wolfe.step_sizes, a.frank_wolfe.iterations, a.frank_wolfe.converged,
                a.seconds) == (b.frank_wolfe.objective, b.frank_wolfe.step_sizes, b.frank_wolfe.iterations,
                               b.frank_wolfe.converged, b.seconds)
    # another Frank-Wolfe setting is another job: merged again
    with pytest.raises(RunsFailed, match="(?s)4 of 4 merges failed.*merged again"):
        ch.merge_study(trained, 3, [2, 3], DIGITS, {**FW, "max_iter": 5}, 0, merge_sets={"resnet": 1})


def test_models_and_merge_jobs_run_on_one_thread_whoever_runs_them(data_dir, monkeypatch):
    """A model trained in the chapter's process (``workers: 1``) on a caller's two threads must have the bits of one
    trained in a worker process (one thread): their cache keys name no thread count. The same for merge jobs."""
    from mergelab.training import scratch
    from mergelab.utils import torch_threads

    seen = []
    real_train, real_merge = scratch._train_from_scratch, ch.merge_methods
    monkeypatch.setattr(scratch, "_train_from_scratch",
                        lambda *a: seen.append(("train", torch.get_num_threads())) or real_train(*a))
    monkeypatch.setattr(ch, "merge_methods", lambda *a: seen.append(("merge", torch.get_num_threads())) or real_merge(*a))
    with torch_threads(2):
        trained = ch.train_all({"mlp": ARCHS["mlp"]}, 2, 0, DIGITS)
        ch.merge_study(trained, 2, [2], DIGITS, FW, 0)
        assert torch.get_num_threads() == 2  # the caller's setting is given back
    assert {kind for kind, _ in seen} == {"train", "merge"} and {n for _, n in seen} == {scratch.SCRATCH_THREADS}


def _both_archs(changes: dict | None = None) -> dict:
    """MLP and ResNet results where every claim of chapter 06 holds; ``changes`` maps (arch, method) to an accuracy
    or (arch, "cycle", which) to a cycle error."""
    acc = {"mlp": {"endpoints": .95, "naive": .30, "naive_repair": .90, "merge_many": .91, "merge_many_repair": .92,
                   "c2m3": .91, "c2m3_repair": .92},
           "resnet": {"endpoints": .98, "naive": .20, "naive_repair": .40, "merge_many": .80, "merge_many_repair": .93,
                      "c2m3": .80, "c2m3_repair": .95}}
    cycles = {a: {"c2m3": 0.0, "pairwise": 0.9} for a in acc}
    for key, value in (changes or {}).items():
        if key[1] == "cycle":
            cycles[key[0]][key[2]] = value
        else:
            acc[key[0]][key[1]] = value
    out = {}
    for arch, m in acc.items():
        methods = {k: {"accuracy": v} for k, v in m.items()}
        methods["c2m3"]["relative_to_endpoints"] = m["c2m3"] / m["endpoints"]
        out[arch] = {"methods": methods, "cycle_errors": {k: {"mean": v} for k, v in cycles[arch].items()},
                     "paired": {"c2m3_repair_vs_merge_many_repair": {"difference": .02, "standard_error": .005}},
                     "merge_sets": None}
    return out


@pytest.mark.parametrize("change, claim_part", [
    ({("mlp", "naive"): .60}, "mlp: averaging models trained from different initializations"),
    ({("resnet", "naive"): .60}, "resnet: averaging models trained from different initializations"),
    ({("mlp", "cycle", "c2m3"): 1e-3}, "mlp: C2M3's pairwise maps are cycle-consistent"),
    ({("resnet", "cycle", "pairwise"): 0.0}, "resnet: C2M3's pairwise maps are cycle-consistent"),
    ({("mlp", "c2m3"): .80}, "mlp: the C2M3 merge keeps at least 0.9 x"),
    ({("resnet", "naive"): .70, ("resnet", "c2m3_repair"): .95}, "resnet: C2M3 with REPAIR is above naive averaging"),
    ({("mlp", "c2m3"): .75, ("mlp", "c2m3_repair"): .98}, "REPAIR matters for conv nets, not for MLPs"),
])
def test_each_claim_of_chapter_06_is_reproduced_when_it_holds_and_not_when_it_fails(change, claim_part):
    holds = {c["claim"]: c["status"] for c in ch.claims(_both_archs())}
    assert len(holds) == 8 and set(holds.values()) == {"reproduced"}
    fails = [c for c in ch.claims(_both_archs(change)) if claim_part in c["claim"]]
    assert len(fails) == 1 and fails[0]["status"] == "not_reproduced", fails


# ---------------------------------------------------------------- fast checks on models that train nothing

def _untrained(arch: str, states: int = 3, **recipe) -> tuple[ch.Trained, object]:
    """``states`` freshly initialized models of ``arch`` (seeds 0, 1, ...; the test recipe updated by ``recipe``),
    wrapped as the chapter's Trained."""
    from dataclasses import replace

    from mergelab.training.scratch import new_model

    split, _ = ch.digits_data(DIGITS)
    cfg = ScratchConfig(arch=arch, **{**ALL_ARCHS[arch], **recipe}, seed=0)
    inits = [{k: v.detach().clone() for k, v in new_model(replace(cfg, seed=s), split)[0].state_dict().items()}
             for s in range(states)]
    model, spec = new_model(cfg, split)
    return ch.Trained(arch, model, spec, inits, cfg), split


def _permuted_copies(t: ch.Trained, seeds: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    """The first state and its copies permuted at random (one generator seed per copy)."""
    from mergelab.alignment import apply_permutation, random_permutations

    a = t.states[0]
    sizes = t.spec.group_sizes(a)
    return [a] + [apply_permutation(t.spec, random_permutations(sizes, torch.Generator().manual_seed(s)), a)
                  for s in seeds]


@pytest.mark.parametrize("arch", sorted(ALL_ARCHS))
def test_permuting_hidden_units_changes_the_weights_and_not_the_function(arch):
    t, split = _untrained(arch)
    r = ch.permutation_invariance(t, split, seed=3)
    assert r["max_weight_change"] > 1e-2  # the permutation moved units
    assert r["max_logit_change"] < 1e-4  # ... and the network computes the same logits
    assert r["accuracy"] == r["accuracy_permuted"]


@pytest.mark.parametrize("arch", sorted(ALL_ARCHS))
def test_interpolating_a_model_and_its_permuted_copy_is_flat_once_aligned(arch):
    t, split = _untrained(arch)
    t.states[:2] = _permuted_copies(t, (5,))
    df = ch.interpolation(t, split, points=5, seed=0)
    assert sorted(df.columns) == ["accuracy", "aligned", "barrier", "lam", "loss"]
    for aligned in (False, True):
        part = df[df.aligned == aligned].reset_index(drop=True)
        assert list(part.lam) == [0, .25, .5, .75, 1]
        assert part.barrier[0] == part.barrier[4] == 0  # the straight line meets the curve at its ends
    aligned = df[df.aligned].reset_index(drop=True)
    # weight matching recovers the permutation: every point of the aligned line is the first model
    assert aligned.loss.max() - aligned.loss.min() < 1e-5 and aligned.barrier.abs().max() < 1e-5
    assert aligned.accuracy.nunique() == 1
    # the unaligned midpoint is the plain average, its barrier its loss above the ends' mean
    plain = df[~df.aligned].reset_index(drop=True)
    a, b = t.states[0], t.states[1]
    mid = evaluate_state(t.model, {k: .5 * a[k] + .5 * b[k] for k in a}, split.X_test, split.y_test)
    assert plain.loss[2] == pytest.approx(mid["loss"])
    assert plain.barrier[2] == pytest.approx(mid["loss"] - (plain.loss[0] + plain.loss[4]) / 2)
    with pytest.raises(ValueError, match=r"barrier_points=1 is not valid; use at least 2"):
        ch.interpolation(t, split, points=1, seed=0)


def test_alignment_maps_are_the_identity_for_naive_averaging_and_the_methods_own_otherwise():
    from mergelab.alignment import random_permutations

    sizes = {"h0": 4, "h1": 3}
    g = torch.Generator().manual_seed(0)
    mm = [random_permutations(sizes, g) for _ in range(3)]
    fw = [random_permutations(sizes, g) for _ in range(3)]
    maps = ch.alignment_maps(sizes, 3, mm, fw)
    assert sorted(maps) == ["c2m3", "merge_many", "naive"]
    assert len(maps["naive"]) == 3
    assert all(torch.equal(p[k], torch.arange(n)) for p in maps["naive"] for k, n in sizes.items())
    assert maps["merge_many"] == mm and maps["c2m3"] == fw


@pytest.mark.parametrize("arch", sorted(ALL_ARCHS))
def test_weight_similarity_of_a_permuted_copy_is_one_once_matched(arch):
    t, _ = _untrained(arch)
    t.states[:2] = _permuted_copies(t, (4,))
    table = ch.weight_similarity(t, seed=0)
    kinds = set(table["kind"])
    assert len(table) == len(kinds) and not any(part.isdigit() for k in kinds for part in k.split("."))
    assert (table["cosine_after"] > 1 - 1e-9).all(), table  # the matching undid the permutation, kind by kind
    assert (table.set_index("kind")["cosine_before"] < 0.9).any(), table  # and there was something to undo
    assert table["parameters"].sum() == sum(v.numel() for v in t.states[0].values() if v.ndim >= 2)
    if arch == "vit":  # one row per kind of tensor, its blocks together, and no 1-D tensor (norms, biases)
        assert kinds == {"conv1.weight", "positional_embedding", "proj", "transformer.resblocks.*.attn.in_proj_weight",
                         "transformer.resblocks.*.attn.out_proj.weight", "transformer.resblocks.*.mlp.c_fc.weight",
                         "transformer.resblocks.*.mlp.c_proj.weight"}
    if arch == "resnet":  # stage and block indices both pooled
        assert "stages.*.*.conv1.weight" in kinds


def test_pair_average_keeping_takes_the_named_tensors_from_the_first_model():
    t, split = _untrained("vit")
    t.states[:2] = _permuted_copies(t, (5,))  # a model and its permuted copy: every merge is the model itself
    r = ch.pair_average_keeping(t, split, [".attn."], seed=0)
    assert r["kept"] == 4  # one block: in_proj weight and bias, out_proj weight and bias
    assert r["model_a"] == r["aligned_average"] == r["keeping"]
    t2, _ = _untrained("vit")  # unrelated models: the kept tensors are the first model's, the others averaged
    average, keeping, kept = ch.pair_merges_keeping(t2, [".attn.", "conv1"], seed=0)
    assert len(kept) == 5 and "conv1.weight" in kept
    a = t2.states[0]
    for k, v in keeping.items():
        assert torch.equal(v, a[k] if k in kept else average[k]), k
    assert not torch.equal(keeping["proj"], a["proj"])  # the others are averaged (LayerNorms start equal: not those)
    with pytest.raises(ValueError, match=r"keep=\['.attention.'\] names no parameter of the vit"):
        ch.pair_average_keeping(t2, split, [".attention."], seed=0)


@pytest.mark.parametrize("arch", sorted(ALL_ARCHS))
def test_cycle_maps_of_permuted_copies_close_and_a_broken_cycle_is_counted_by_group_size(arch):
    from types import SimpleNamespace

    from mergelab.alignment import random_permutations

    # groups of unequal sizes, so the mean's weights matter (the ViT's: the residual stream 8, the MLP's units 32)
    t, _ = _untrained(arch, **({} if arch == "vit" else {"widths": [8, 5]}))
    t.states[:3] = _permuted_copies(t, (1, 2))
    sizes = t.spec.group_sizes(t.states[0])
    assert len(set(sizes.values())) > 1, sizes
    g = torch.Generator().manual_seed(7)
    universes = [random_permutations(sizes, g) for _ in range(3)]
    maps = ch.cycle_maps(t, t.states, SimpleNamespace(perms=universes), universes, seed=0)
    assert sorted(maps) == ["c2m3", "merge_many", "pairwise"] and all(len(m) == 3 for m in maps.values())
    errors = ch.cycle_errors(t, maps)
    for name in ("pairwise", "merge_many", "c2m3"):  # exact copies: pairwise matching closes the cycle too
        assert errors[name]["mean"] == 0 and set(errors[name]["per_group"]) == set(sizes), name
    # break the cycle in one group by swapping two units of one map: 2 of its units go astray
    group = max(sizes, key=sizes.get)
    broken = {k: v.clone() for k, v in maps["pairwise"][2].items()}
    broken[group][[0, 1]] = broken[group][[1, 0]]
    bad = ch.cycle_errors(t, {"pairwise": [*maps["pairwise"][:2], broken]})["pairwise"]
    assert bad["per_group"][group] == pytest.approx(2 / sizes[group])
    assert bad["mean"] == pytest.approx(2 / sum(sizes.values()))
