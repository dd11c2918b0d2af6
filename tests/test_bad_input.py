"""Bad input to the public entry points gets a clear error naming the parameter, its value and what is valid,
instead of a silently wrong result (every merged triplet dropped, all fitness 0, NaN weights) or an error from deep
inside torch or numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.task_vectors import TaskVector


def _tvs(n: int = 2) -> list[TaskVector]:
    g = torch.Generator().manual_seed(0)
    return [TaskVector({"w": torch.randn(4, 4, generator=g)}) for _ in range(n)]


@pytest.mark.parametrize("options, match", [
    ({"rtol": math.nan}, "rtol=nan is not valid"),
    ({"rtol": 1.0}, r"rtol=1.0 is not valid; use a number in \[0, 1\)"),  # every triplet would count as zero
    ({"oversample": 2.5}, "oversample=2.5 is not valid"),
    ({"n_iter": -1}, "n_iter=-1 is not valid"),
    ({"seed": -1}, "seed=-1 is not valid"),
])
def test_the_truncated_svd_refuses_solver_options_that_drop_every_triplet_or_fail_inside_torch(options, match):
    from mergelab.linalg import truncated_svd

    with pytest.raises(ValueError, match=match):
        truncated_svd(torch.randn(2, 6, 6), 2, **options)


@pytest.mark.parametrize("value", [True, "0.5", 0.0, 1.5, math.nan])
def test_rank_fraction_must_be_a_fraction(value):
    from mergelab.linalg import default_rank

    with pytest.raises(ValueError, match=f"rank_fraction={value!r} is not valid"):
        default_rank((8, 8), rank_fraction=value)


def test_tsv_merge_passes_the_solver_checks_on():
    from mergelab.merging import get_merge

    pretrained = {"w": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="rtol=2.0 is not valid"):
        get_merge("tsv_merge").fn(pretrained, _tvs(), rtol=2.0)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, "30"])
def test_the_tiny_heads_logit_scale_must_be_positive(value):
    from mergelab.benchmarks.tiny import TinyBenchmarkConfig

    with pytest.raises(ValueError, match=f"logit_scale={value!r} is not valid; use a positive number"):
        TinyBenchmarkConfig(logit_scale=value)


@pytest.mark.parametrize("value", [-4, 0, 2.5])
def test_the_response_evaluator_refuses_a_batch_size_that_would_score_every_model_zero(value):
    from mergelab.analysis.responses import ResponseEvaluator

    with pytest.raises(ValueError, match=f"batch_size={value!r} is not valid"):
        ResponseEvaluator(object(), batch_size=value)


@pytest.mark.parametrize("kwargs, match", [
    ({"task_vectors": _tvs()}, "task_vectors is a list; pass a {task: TaskVector} mapping"),
    ({"methods": "ties"}, r"methods='ties' is not valid; give a list of method names, e.g. \['ties'\]"),
    ({"options": {"tie": {"density": 0.2}}}, r"options has 'tie', which is not in methods=\['ties'\]"),
    ({"expert_val": {"a": math.nan, "b": 0.9}}, r"expert_val\['a'\]=nan is not valid"),
    ({"expert_val": {"a": 90.0, "b": 0.9}}, r"expert_val\['a'\]=90.0 is not valid; use accuracies as fractions"),
])
def test_merge_baselines_names_what_is_wrong_before_merging(kwargs, match):
    from mergelab.evaluation import merge_baselines

    args = {"task_vectors": dict(zip("ab", _tvs())), "methods": ["ties"], "options": None,
            "expert_val": {"a": 0.9, "b": 0.9}, **kwargs}
    with pytest.raises(ValueError, match=match):
        merge_baselines(None, {"w": torch.zeros(4, 4)}, args["task_vectors"], args["methods"], options=args["options"],
                        progress=False, expert_val=args["expert_val"])


@pytest.mark.parametrize("task_vectors, coefficients, match", [
    (_tvs(), [math.nan, 1.0], r"coefficients=\[nan, 1.0\] is not valid; use finite numbers"),
    (_tvs(), ["a", 1.0], "coefficients=.* is not valid; use numbers, one per task"),
    (dict(zip("ab", _tvs())), [1.0, 1.0], "task_vectors is a mapping; pass a list of TaskVector"),
])
def test_per_task_task_arithmetic_refuses_coefficients_that_give_nan_weights(task_vectors, coefficients, match):
    from mergelab.merging.evolve import task_arithmetic_per_task

    with pytest.raises(ValueError, match=match):
        task_arithmetic_per_task({"w": torch.zeros(4, 4)}, task_vectors, coefficients)


@pytest.mark.parametrize("kwargs, match", [
    ({"upper": [math.inf, 1.0]}, "must be non-empty, finite"),
    ({"pop_size": 2.7}, "pop_size=2.7 is not valid; use an integer >= 2"),
    ({"n_gen": 0}, "n_gen=0 is not valid"),
    ({"seed": -1}, "seed=-1 is not valid"),
])
def test_evolve_checks_its_box_sizes_and_seed_before_scoring_anything(kwargs, match):
    from mergelab.merging.evolve import evolve

    scored = []
    args = {"lower": [0.0, 0.0], "upper": [1.0, 1.0], "pop_size": 4, "n_gen": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        evolve(lambda X: scored.append(X) or X.sum(1), progress=False, **args)
    assert not scored


def test_evolve_refuses_a_checkpoint_that_is_a_folder_or_not_a_checkpoint(tmp_path):
    from mergelab.merging.evolve import evolve

    def run(checkpoint):
        return evolve(lambda X: X.sum(1), [0.0], [1.0], pop_size=4, n_gen=1, checkpoint=checkpoint, progress=False)

    with pytest.raises(ValueError, match="is a folder; give the path of a JSON file"):
        run(tmp_path)
    (tmp_path / "notes.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="is not a search checkpoint"):
        run(tmp_path / "notes.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"is not a search checkpoint \(not JSON"):
        run(tmp_path / "broken.json")
    assert run(tmp_path / "new.json").best_x.shape == (1,)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": -19}, "batch_size=-19 is not valid"),  # X[:-19] would quietly drop the last 19 examples
    ({"batch_size": 0}, "batch_size=0 is not valid"),
    ({"iters": 0}, "iters=0 is not valid"),
])
def test_estimate_curvature_names_a_bad_batch_size(kwargs, match):
    from mergelab.experiments.ch01_stability import estimate_curvature

    with pytest.raises(ValueError, match=match):
        estimate_curvature(None, [("colours", 0, {})], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 2.5}, "batch_size=2.5 is not valid"),
    ({"max_per_task": 0}, "max_per_task=0 is not valid"),  # no batches, then a division by zero
    ({"max_per_task": -1}, "max_per_task=-1 is not valid"),
    ({"seed": -1}, "seed=-1 is not valid"),
])
def test_mass_mixed_batches_name_a_bad_setting(kwargs, match):
    from mergelab.experiments.ch04_mass import mixed_batches

    with pytest.raises(ValueError, match=match):
        next(mixed_batches(None, "val", ["colours"], **kwargs))


@pytest.mark.parametrize("eps", [math.nan, -1e-8, 0.0])
def test_repair_refuses_an_eps_that_would_write_nan_weights(eps):
    from mergelab.alignment.repair import repair

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"eps={eps!r} is not valid; use a positive number"):
        repair(model, [model], torch.randn(2, 3, 8, 8), eps=eps)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_training_recipes_refuse_a_warm_up_longer_than_training_and_a_momentum_outside_0_1():
    from mergelab.training import FinetuneConfig
    from mergelab.training.scratch import ScratchConfig

    with pytest.raises(ValueError, match="warmup_epochs=10 is not valid; use 0..epochs=2"):
        ScratchConfig(epochs=2, warmup_epochs=10)
    for momentum in (5.0, 1.0, math.nan):
        with pytest.raises(ValueError, match=rf"momentum={momentum!r} is not valid; use a number < 1"):
            FinetuneConfig(momentum=momentum)
    assert np.isclose(FinetuneConfig(momentum=0.0).momentum, 0.0)


@pytest.mark.parametrize("batch_size, max_per_task", [(4, None), (5, 3), (100, None), (1, 2)])
def test_the_mass_progress_total_is_the_number_of_mixed_batches(batch_size, max_per_task):
    from mergelab.experiments.ch04_mass import mixed_batch_count, mixed_batches

    class Bench:
        sizes = {"a": 7, "b": 3}

        def split(self, task, split):
            return None, torch.arange(self.sizes[task])

        def images(self, task, split, rows):
            return torch.zeros(len(rows), 3, 2, 2)

    bench = Bench()
    batches = list(mixed_batches(bench, "val", ["a", "b"], batch_size, max_per_task=max_per_task))
    assert mixed_batch_count(bench, "val", ["a", "b"], batch_size, max_per_task) == len(batches)


def test_the_irt_estimators_refuse_empty_or_non_finite_abilities_and_a_negative_anchor_seed():
    from mergelab.analysis.irt import IRTModel, fit_merge_weights, p_irt, select_anchors

    model = IRTModel(discrimination=np.ones((6, 1)), difficulty=np.zeros(6))
    items, answers = np.array([0, 1]), np.array([1.0, 0.0])
    with pytest.raises(ValueError, match=r"endpoint_theta must be \(K >= 1, D=1\) finite abilities; got shape \(0, 1\)"):
        fit_merge_weights(model, np.zeros((0, 1)), items, answers)
    with pytest.raises(ValueError, match="with non-finite values"):
        fit_merge_weights(model, np.array([[math.nan]]), items, answers)
    with pytest.raises(ValueError, match="theta must be one finite ability vector"):
        p_irt(model, items, answers, np.array([math.nan]))
    with pytest.raises(ValueError, match="seed=-1 is not valid"):
        select_anchors(model, 2, seed=-1)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_random": -1}, "num_random=-1 is not valid"),
    ({"num_held_out": 2.5}, "num_held_out=2.5 is not valid"),
    ({"num_held_out": 1}, r"num_held_out=1 is not valid; use an integer >= 4: half of the held-out merges choose"),
    ({"coefficient_max": 0.0}, "coefficient_max=0.0 is not valid; use a positive number"),
    ({"coefficient_max": math.nan}, "coefficient_max=nan is not valid"),
    ({"other_merges": {"dares": [0.3]}}, "dares"),
    ({"other_merges": {"dare": 0.3}}, r"other_merges\['dare'\]=0.3 is not valid; use a list of coefficients"),
    ({"other_merges": {"dare": [None]}}, r"other_merges\['dare'\] has None; use numbers"),
    ({"other_merges": {"weight_averaging": [0.5]}}, r"other_merges\['weight_averaging'\] has 0.5; use \[None\]"),
    ({"other_merges": {"tsv_merge": ["1"]}}, r"other_merges\['tsv_merge'\] value"),
    ({"other_merges": [("dare", [0.3])]}, "other_merges=.* is not valid; use a mapping"),
])
def test_the_merge3_population_names_a_bad_size_or_range(kwargs, match):
    from mergelab.experiments.ch05_merge3 import population

    args = {"num_random": 2, "num_held_out": 4, "coefficient_max": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        population(None, {}, {}, {}, [], [], **args)


def test_c2m3_study_refuses_a_misspelt_frank_wolfe_option_before_merging(monkeypatch):
    from mergelab.experiments import ch06_c2m3

    with pytest.raises(ValueError, match="frank_wolfe has 'max_iters', which is not an option of C2M3's Frank-Wolfe; "
                                         "valid: max_iter, tol, patience, noise"):
        ch06_c2m3.merge_study({}, 2, [2], {}, {"max_iters": 10}, seed=0)
    from mergelab.training.scratch import ScratchConfig

    with pytest.raises(ValueError, match=r"widths=\(\) is not valid; use a non-empty list"):
        ScratchConfig(widths=())


@pytest.mark.parametrize("data, match", [
    ({"eval_cache_gb": math.nan}, "data eval_cache_gb=nan is not valid; use a number >= 0"),
    ({"eval_cache_gb": -1}, "data eval_cache_gb=-1 is not valid"),
    ({"max_train": True}, "data max_train=True is not valid; use a positive integer or null"),
    ({"max_test": 2.5}, "data max_test=2.5 is not valid"),
    ({"num_workers": False}, "data num_workers=False is not valid; use an integer >= 0"),
    ({"eval_batch_size": "256"}, "data eval_batch_size='256' is not valid; use a positive integer"),
    ({"train_epochs": {"MNIST": True}}, "data train_epochs=.* is not valid"),
    ({"train_epochs": {}}, r"data train_epochs=\{\} is not valid"),
    ({"train_epochs": {"mnist": 5}}, "data train_epochs names 'mnist', not a clip task; valid: .*MNIST"),
    ({"synthetic": "yes"}, "data synthetic='yes' is not valid; use true"),
    ({"root": 3}, "data root=3 is not valid; use a folder path or null"),
])
def test_the_clip_data_settings_name_a_bad_value(data, match):
    from mergelab.benchmarks.clip.config import ClipBenchmarkConfig

    with pytest.raises(ValueError, match=match):
        ClipBenchmarkConfig.from_params(data=data)


def test_the_clip_checkpoint_interval_is_a_positive_integer():
    from mergelab.benchmarks.clip.config import ClipBenchmarkConfig

    for value in (True, 0, 2.0):
        with pytest.raises(ValueError, match=f"checkpoint_every={value!r} is not valid; use a positive integer"):
            ClipBenchmarkConfig.from_params(checkpoint_every=value)


@pytest.mark.parametrize("grid", [0.3, {"a": 0.1}, "0.1,0.2"])
def test_a_validation_grid_is_a_list_of_coefficients(grid):
    from mergelab.merging.select import merge_with_validation

    with pytest.raises(ValueError, match="grid=.* is not valid; use a list of coefficients"):
        merge_with_validation("task_arithmetic", {"w": torch.zeros(4, 4)}, _tvs(), lambda s: 0.0, grid=grid)


@pytest.mark.parametrize("fractions, match", [
    ([], r"rank_fractions=\[\] is not valid; give a non-empty list"),
    (0.5, "rank_fractions=0.5 is not valid"),
    ([0.0, 1.5], r"rank_fractions value=1.5 is not valid; use a number in \[0, 1\]"),
    ([math.nan], "rank_fractions value=nan is not valid"),
])
def test_spectrum_curves_read_rank_fractions_in_0_1(fractions, match):
    from mergelab.analysis.spectra import spectrum_curves

    tvs = {"a": TaskVector({"transformer.resblocks.0.mlp.c_fc.weight": torch.randn(8, 4)})}
    with pytest.raises(ValueError, match=match):
        spectrum_curves(tvs, rank_fractions=fractions)


def test_merging_by_epochs_needs_epochs_of_the_trajectories():
    from types import SimpleNamespace

    from mergelab.experiments.ch02_gradients import merging_by_epochs

    trajectories = {("sgd", 0.1, "a"): SimpleNamespace(epochs=3)}
    for epochs, match in (([], r"epochs=\[\] is not valid; give epochs from 1..3"),
                          ([True], "epochs contains True; the trajectories have epochs 1..3"),
                          ([4], "epochs contains 4")):
        with pytest.raises(ValueError, match=match):
            merging_by_epochs(None, {}, trajectories, {"sgd": 0.1}, ["task_arithmetic"], {}, {}, epochs=epochs)


def test_cosine_similarity_needs_a_task_vector():
    from mergelab.task_vectors import cosine_similarity_matrix

    with pytest.raises(ValueError, match="task_vectors is empty"):
        cosine_similarity_matrix({})


def test_the_coefficients_kept_beside_a_sweep_may_come_from_any_iterable():
    from mergelab.merging.select import merge_with_validation

    for also_at in ([0.7], (c for c in [0.7]), np.array([0.7])):
        got = merge_with_validation("task_arithmetic", {"w": torch.zeros(4, 4)}, _tvs(), lambda s: 0.0,
                                    grid=[0.0, 1.0], also_at=also_at)
        assert list(got.also) == [0.7], also_at


@pytest.mark.parametrize("also_at", [0.3, "1.0", [1.0, "x"], [math.nan]])
def test_the_coefficients_kept_beside_a_sweep_are_a_list_of_numbers(also_at):
    from mergelab.merging.select import merge_with_validation

    with pytest.raises(ValueError, match=r"also_at(=| value=).* is not valid"):
        merge_with_validation("task_arithmetic", {"w": torch.zeros(4, 4)}, _tvs(), lambda s: 0.0, grid=[0.0, 1.0],
                              also_at=also_at)


def test_a_single_task_name_is_refused_where_a_list_of_tasks_is_expected_not_read_as_its_letters():
    from types import SimpleNamespace

    from mergelab.analysis.responses import ResponseEvaluator
    from mergelab.training import FinetuneConfig
    from mergelab.training.sweep import sweep
    from mergelab.training.trajectories import multitask_epoch_trajectory

    bench = SimpleNamespace(tasks=("colours", "size"), heads={})
    cfg = FinetuneConfig(num_steps=2, batch_size=4, warmup_steps=0)
    match = r"tasks='colours' is not valid; give a list of task names, e\.g\. \['colours'\]"
    with pytest.raises(ValueError, match=match):
        sweep(bench, [cfg], "colours", progress=False)
    with pytest.raises(ValueError, match=match):
        ResponseEvaluator(bench, "colours")
    with pytest.raises(ValueError, match=match):
        multitask_epoch_trajectory(bench, "colours", cfg, 1)


@pytest.mark.parametrize("probe_size", [2.5, "8", -1, True])
def test_the_sweep_probe_size_is_a_non_negative_integer(probe_size):
    from types import SimpleNamespace

    from mergelab.training import FinetuneConfig
    from mergelab.training.sweep import sweep

    bench = SimpleNamespace(tasks=("colours",), heads={})
    with pytest.raises(ValueError, match=rf"probe_size={probe_size!r} is not valid; use an integer >= 0"):
        sweep(bench, [FinetuneConfig(num_steps=2, batch_size=4, warmup_steps=0)], ["colours"], probe_size=probe_size,
              progress=False)


def test_a_fine_tuning_recipe_given_as_a_mapping_is_refused_with_the_dataclass_to_use():
    import mergelab

    bench = mergelab.load_benchmark("tiny", device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"cfg=\{'lr': 0\.001\} is not valid; pass a FinetuneConfig, e\.g\. "
                                         r"FinetuneConfig\(\*\*\{'lr': 0\.001\}\).*valid fields: .*num_steps"):
        bench.run_key("expert", ["colours"], {"lr": 1e-3})


@pytest.mark.parametrize("digits, match", [
    ({"test_fraction": .25, "split_seed": 0, "test_frac": .5}, r"give exactly test_fraction, split_seed \(it names "
                                                               r"\['split_seed', 'test_frac', 'test_fraction'\]\)"),
    ({"test_fraction": .25}, r"give exactly test_fraction, split_seed \(it names \['test_fraction'\]\)"),
    ({"test_fraction": .25, "split_seed": 1.9}, r"digits split_seed=1\.9 is not valid; use an integer >= 0"),
    ({"test_fraction": .25, "split_seed": True}, r"digits split_seed=True is not valid"),
    ({"test_fraction": .25, "split_seed": -1}, r"digits split_seed=-1 is not valid"),
    ({"test_fraction": 1.0, "split_seed": 0}, r"digits test_fraction=1\.0 is not valid; use a number in \(0, 1\)"),
])
def test_chapter_06_digits_settings_name_what_is_wrong(digits, match):
    from mergelab.experiments.ch06_models import _check_num_models, digits_data

    with pytest.raises(ValueError, match=match):
        digits_data(digits)
    with pytest.raises(ValueError, match=r"num_models='3' is not valid; merging needs at least 2 models"):
        _check_num_models("3")


def test_seed_everything_takes_a_numpy_integer_and_refuses_a_float_by_name():
    import random

    from mergelab.utils import seed_everything

    seed_everything(np.int64(3))
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_everything(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    with pytest.raises(ValueError, match=r"seed=3\.0 is not valid; use an integer >= 0"):
        seed_everything(3.0)


@pytest.mark.parametrize("methods, required, match", [
    (["task_arithmetic", "tsv_marge"], (), r"merge_methods=\['task_arithmetic', 'tsv_marge'\] is not valid: 'tsv_marge' "
                                           r"is not a registered merge method; valid: .*tsv_merge"),
    (["weight_averaging", "ties"], ("task_arithmetic",), r"merge_methods=\['weight_averaging', 'ties'\] is not valid: it "
                                                         r"must include 'task_arithmetic'"),
    ("task_arithmetic", (), r"merge_methods='task_arithmetic' is not valid; give a list of method names, e\.g\. "
                            r"\['task_arithmetic'\] \(registered: .*tsv_merge"),
    (None, (), r"merge_methods=None is not valid; give a list of method names"),  # papermill -p merge_methods None
    (["ties", "ties"], (), r"'ties' is named twice"),
])
def test_a_chapters_merge_methods_are_checked_before_anything_trains(methods, required, match):
    """A misspelt method used to be dropped silently (chapter 02) or fail with a KeyError after every merge had been
    computed (chapters 00 and 03 read task arithmetic's sweep)."""
    from mergelab.merging import check_methods

    with pytest.raises(ValueError, match=match):
        check_methods(methods, "merge_methods", required=required)
    assert check_methods(("ties", "task_arithmetic"), required=["task_arithmetic"]) == ["ties", "task_arithmetic"]
    with pytest.raises(ValueError, match=r"'tsv_merge' is merged by this chapter anyway; remove it from the list"):
        check_methods(["task_arithmetic", "tsv_merge"], excluded=["tsv_merge"])  # chapter 03 adds TSV-M itself


def test_chapter_02s_merge_optimizers_need_section_2s_runs_and_positive_rates():
    from mergelab.experiments.ch02_gradients import nearest_learning_rates

    grid = {"sgd": [1e-4, 3e-4, 1e-3], "adamw": [2.5e-4, 5e-4, 1e-3]}
    assert nearest_learning_rates(grid, {"sgd": 0.01, "adamw": 0.0005}) == {"sgd": 1e-3, "adamw": 5e-4}
    with pytest.raises(ValueError, match=r"merge_learning_rates has 'adamw', which learning_rates=\{'sgd': .*\} does not "
                                         r"run; add 'adamw' to learning_rates or use one of 'sgd'"):
        nearest_learning_rates({"sgd": grid["sgd"]}, {"adamw": 0.0005})
    with pytest.raises(ValueError, match=r"merge_learning_rates\['sgd'\]=0 is not valid; use a positive learning rate"):
        nearest_learning_rates(grid, {"sgd": 0})


def test_chapter_05s_anchor_schemes_must_include_the_random_subsets_its_summaries_read():
    from mergelab.experiments.ch05_merge3 import check_anchor_schemes

    assert check_anchor_schemes(("random", "clustered")) == ["random", "clustered"]
    for bad in (["clustered"], ["random", "kmeans"], "random", None):
        with pytest.raises(ValueError, match=r"anchor_schemes=.* is not valid; use a list of 'random', 'clustered' "
                                             r"that includes 'random'"):
            check_anchor_schemes(bad)


def test_a_chapters_finetune_parameter_names_a_wrong_or_doubled_key_and_the_valid_fields():
    """Every chapter builds its recipe from its ``finetune`` parameter; a misspelt key used to surface as a
    TypeError of the dataclass naming neither the parameter nor the valid fields, and chapter 01's ``centre``
    setting a key the recipe sets too as 'got multiple values'."""
    from mergelab.training import FinetuneConfig

    recipe = {"optimizer": "adamw", "lr": 5e-4, "num_steps": 300, "warmup_steps": 30}
    assert FinetuneConfig.from_params(recipe, seed=2) == FinetuneConfig(**recipe, seed=2)
    with pytest.raises(ValueError, match=r"finetune=\{.*'steps': 300\} has 'steps', which is not a fine-tuning "
                                         r"setting; valid: optimizer, lr, .*num_steps"):
        FinetuneConfig.from_params({**recipe, "steps": 300}, seed=0)
    with pytest.raises(ValueError, match=r"finetune sets 'lr'=0\.0005, which centre sets too \(lr=0\.01\); remove it "
                                         r"from one of them"):
        FinetuneConfig.from_params(recipe, settings_name="centre", seed=0, lr=0.01)
    with pytest.raises(ValueError, match=r"centre=\{.*'learning_rate': 0\.01\} has 'learning_rate'"):
        FinetuneConfig.from_params(recipe, settings_name="centre", seed=0, learning_rate=0.01)
    with pytest.raises(ValueError, match=r"finetune=\[.*\] is not valid; give a mapping of fine-tuning settings"):
        FinetuneConfig.from_params([("lr", 1e-3)], seed=0)
