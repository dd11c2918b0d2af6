"""The sweep: one run gives several cached checkpoints, reruns train nothing, interrupted sweeps resume."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

import mergelab
from mergelab.training import FinetuneConfig, finetune
from mergelab.training.sweep import checkpoint_log, checkpoint_path, config_grid, one_at_a_time, plan_runs, sweep
from mergelab.utils import load_safetensors

SMOKE = dict(tasks=["colours", "position"], data={"n_train": 64, "n_val": 16, "n_test": 32, "n_pretext": 64},
             model={"width": 16, "layers": 1, "heads": 2, "patch_size": 8},
             pretrain={"num_steps": 2, "batch_size": 16, "warmup_steps": 1}, head_shots=2)
CFG = FinetuneConfig(optimizer="sgd", lr=0.02, batch_size=8, num_steps=4, schedule="constant", warmup_steps=0,
                     weight_decay=1e-4, momentum=0.9, grad_clip=1.0, seed=0, data_fraction=0.5)


@pytest.fixture(scope="module")
def bench(module_data_dir):
    """One small benchmark in a private, initially empty cache for this module's tests."""
    return mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMOKE)


def test_grids_of_configurations():
    assert len(config_grid(CFG, lr=[0.01, 0.02], batch_size=[4, 8, 16])) == 6
    ofat = one_at_a_time(CFG, lr=[0.01, 0.02, 0.03], batch_size=[4, 8])
    assert len(ofat) == 1 + 2 + 1 and ofat[0] == CFG
    with pytest.raises(ValueError, match="learning_rate"):
        config_grid(CFG, learning_rate=[0.1])


def test_plan_shares_one_run_per_constant_schedule_trajectory():
    runs = plan_runs([CFG, replace(CFG, lr=0.03)], ["colours", "position"], steps=[2, 4, 6])
    assert len(runs) == 4 and all(r.steps == (2, 4, 6) and r.config.num_steps == 6 for r in runs)
    # configs that differ only in num_steps share a run
    runs = plan_runs([replace(CFG, num_steps=s) for s in (2, 5)], ["colours"])
    assert len(runs) == 1 and runs[0].steps == (2, 5)
    cosine = replace(CFG, schedule="cosine")
    with pytest.raises(ValueError, match="constant"):
        plan_runs([cosine], ["colours"], steps=[2, 4])
    assert len(plan_runs([replace(cosine, num_steps=s) for s in (2, 4)], ["colours"])) == 2


def test_sweep_caches_every_checkpoint_and_resumes(bench):
    cfg = replace(CFG, seed=11)  # not trained by any other test of this module
    table = sweep(bench, [cfg], ["colours"], steps=[2, 4], probe_size=2, progress=False)
    assert table.attrs["runs_trained"] == 1 and list(table["step"]) == [2, 4] and table["trained"].all()
    paths = [checkpoint_path(bench, "colours", replace(cfg, num_steps=s)) for s in (2, 4)]
    assert all(p.is_file() and p.with_suffix(".json").is_file() for p in paths)
    for p, s in zip(paths, (2, 4)):  # the bound's clipping factors need every step's unclipped norm
        log = json.loads(p.with_suffix(".json").read_text())
        assert len(log["batch_gradient_norm"]) == s and all(n > 0 for n in log["batch_gradient_norm"])
    log = checkpoint_log(bench, "colours", replace(cfg, num_steps=4))
    assert log["gradient_norm_probe"]["steps"] == [0, 2, 4] and len(log["batch_gradient_norm"]) == 4
    assert len(log["loss"]) == 4

    again = sweep(bench, [cfg], ["colours"], steps=[2, 4], probe_size=2, progress=False)
    assert again.attrs["runs_trained"] == 0 and not again["trained"].any()

    # an interruption after the first checkpoint: the second one is missing its log
    paths[1].with_suffix(".json").unlink()
    before = paths[0].stat().st_mtime_ns
    resumed = sweep(bench, [cfg], ["colours"], steps=[2, 4], probe_size=2, progress=False)
    assert resumed.attrs["runs_trained"] == 1
    assert list(resumed["trained"]) == [False, True]
    assert paths[0].stat().st_mtime_ns == before  # what existed is not rewritten
    assert paths[1].with_suffix(".json").is_file()


def test_another_probe_size_records_its_probes_again(bench):
    """Chapter 01's bound reads the gradient-norm probes from the checkpoints' logs: a sweep that asks for
    another probe size (its parameter changed) must record that size, not keep the old probes; the weights
    come out the same (the run is seeded)."""
    cfg = replace(CFG, seed=13)
    sweep(bench, [cfg], ["colours"], steps=[2], probe_size=2, progress=False)
    from safetensors.torch import load_file

    path = checkpoint_path(bench, "colours", replace(cfg, num_steps=2))
    weights = load_file(str(path))  # tensors, not bytes: the file's metadata order may differ between writes
    assert json.loads(path.with_suffix(".json").read_text())["probe_size"] == 2
    wider = sweep(bench, [cfg], ["colours"], steps=[2], probe_size=3, progress=False)
    assert wider.attrs["runs_trained"] == 1
    assert json.loads(path.with_suffix(".json").read_text())["probe_size"] == 3
    again = load_file(str(path))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    none = sweep(bench, [cfg], ["colours"], steps=[2], probe_size=0, progress=False)  # asks for no probes
    assert none.attrs["runs_trained"] == 0


def test_a_retrained_checkpoint_interrupted_before_its_log_is_written_counts_as_missing(bench, monkeypatch):
    """A run trained again for other probes rewrites its weights step by step and its log at the end: the old log
    is dropped first, so an interruption between the two leaves a checkpoint the next sweep trains again, not new
    weights vouched for by the old log's checksum."""
    cfg = replace(CFG, seed=15)
    sweep(bench, [cfg], ["colours"], steps=[2], probe_size=2, progress=False)
    log = checkpoint_path(bench, "colours", replace(cfg, num_steps=2)).with_suffix(".json")
    assert log.is_file()
    train = bench.finetune_encoder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "finetune_encoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(bench, [cfg], ["colours"], steps=[2], probe_size=3, progress=False)
    assert not log.exists()
    monkeypatch.setattr(bench, "finetune_encoder", train)
    again = sweep(bench, [cfg], ["colours"], steps=[2], probe_size=3, progress=False)
    assert again.attrs["runs_trained"] == 1 and json.loads(log.read_text())["probe_size"] == 3


def test_other_checkpoints_record_the_probes_a_cold_sweep_would(bench):
    """Chapter 01 interpolates G_t between a checkpoint's probes, taken at every checkpoint of its run: a sweep
    that adds or drops a checkpoint trains the run again, so each log holds the probes of the sweep asked for."""
    cfg = replace(CFG, seed=14)

    def probed(step):
        return checkpoint_log(bench, "colours", replace(cfg, num_steps=step))["gradient_norm_probe"]["steps"]

    sweep(bench, [cfg], ["colours"], steps=[2, 4], probe_size=2, progress=False)
    assert probed(4) == [0, 2, 4]
    more = sweep(bench, [cfg], ["colours"], steps=[1, 2, 4], probe_size=2, progress=False)
    assert more.attrs["runs_trained"] == 1 and probed(4) == [0, 1, 2, 4] and probed(2) == [0, 1, 2] and probed(1) == [0, 1]
    fewer = sweep(bench, [cfg], ["colours"], steps=[4], probe_size=2, progress=False)
    assert fewer.attrs["runs_trained"] == 1 and probed(4) == [0, 4]
    same = sweep(bench, [cfg], ["colours"], steps=[4], probe_size=2, progress=False)
    assert same.attrs["runs_trained"] == 0


def test_a_checkpoint_is_the_shorter_run_and_bench_expert_finds_it(bench):
    cfg = replace(CFG, seed=12)
    sweep(bench, [cfg], ["colours"], steps=[2, 4], probe_size=0, progress=False)
    short = replace(cfg, num_steps=2)
    files = set(os.listdir(bench.experts_dir))
    cached = bench.expert("colours", short)  # no training: the sweep's checkpoint has this key
    assert set(os.listdir(bench.experts_dir)) == files
    enc = bench.new_encoder(bench.pretrained_state())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep trained
    try:
        finetune(enc, {"colours": bench.split("colours", "train")}, {"colours": bench.heads["colours"]}, short,
                 progress=False)
    finally:
        torch.set_num_threads(threads)
    for k, v in enc.state_dict().items():
        assert torch.allclose(cached[k], v, atol=1e-6), k


def test_sweep_in_two_worker_processes_matches_training_here(bench):
    cfgs = [replace(CFG, seed=13), replace(CFG, lr=0.03, seed=13)]
    table = sweep(bench, cfgs, ["colours"], steps=[3], workers=2, probe_size=0, progress=False)
    assert table.attrs["runs_trained"] == 2
    pooled = {p: load_safetensors(p) for p in table["path"]}
    for p in table["path"]:
        os.remove(p)
        os.remove(p.replace(".safetensors", ".json"))
    here = sweep(bench, cfgs, ["colours"], steps=[3], workers=1, probe_size=0, progress=False)
    assert here.attrs["runs_trained"] == 2
    for p in here["path"]:
        mine = load_safetensors(p)
        assert all(torch.allclose(mine[k], pooled[p][k], atol=1e-5) for k in mine)


def test_bad_sweep_arguments_are_named(bench):
    with pytest.raises(ValueError, match="workers"):
        sweep(bench, [CFG], ["colours"], workers=0)
    with pytest.raises(ValueError, match="nonsense"):
        sweep(bench, [CFG], ["nonsense"])
    with pytest.raises(ValueError, match="steps"):
        plan_runs([CFG], ["colours"], steps=[0])


def test_chapter_00_runs_trained_side_by_side_are_bit_identical_to_those_trained_here(bench):
    """``train_experts`` with two worker processes caches the very weights ``bench.expert`` and
    ``bench.multitask`` train in this process, even at another thread count here: the tiny size trains every
    run on ``train_threads`` (1). The multi-task model trains in the same pool, and counts as a run."""
    from mergelab.experiments.ch00_benchmark import train_experts

    recipe = replace(CFG, schedule="cosine", warmup_steps=1, seed=21)
    joint = replace(recipe, num_steps=2)
    tasks = ["position", "colours"]
    assert train_experts(bench, recipe, [21, 22], tasks, workers=2, progress=False, multitask=joint) == 5
    assert train_experts(bench, recipe, [21, 22], tasks, workers=2, progress=False, multitask=joint) == 0
    runs = {(task, seed): bench.run_artifact("expert", [task], replace(recipe, seed=seed))
            for seed in (21, 22) for task in tasks}
    runs["multitask", 21] = bench.run_artifact("multitask", sorted(tasks), joint)
    assert runs["multitask", 21].meta()["tasks"] == ["colours", "position"]
    pooled = {}
    for name, artifact in runs.items():
        pooled[name] = load_safetensors(str(artifact.path))
        os.remove(artifact.path)
        os.remove(artifact.sidecar)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert train_experts(bench, recipe, [21, 22], tasks, workers=1, progress=False, multitask=joint) == 5
    finally:
        torch.set_num_threads(threads)
    for (task, seed), weights in pooled.items():
        here = (bench.multitask(joint, tasks) if task == "multitask"
                else bench.expert(task, replace(recipe, seed=seed)))
        assert all(torch.equal(here[k], weights[k]) for k in weights), (task, seed)
    with pytest.raises(ValueError, match="workers"):
        train_experts(bench, recipe, [21], workers=0)


def test_side_by_side_experts_are_refused_where_the_size_changes_the_recipe(bench, monkeypatch):
    """A size that trains each task with a recipe of its own (the clip size's public epochs) cannot train
    the given recipe in a pool: the pooled runs would not be the experts ``bench.expert`` uses."""
    from mergelab.experiments.ch00_benchmark import train_experts

    recipe = replace(CFG, seed=23)
    monkeypatch.setattr(bench, "expert_recipe", lambda task, cfg=None: replace(cfg, num_steps=cfg.num_steps + 1))
    with pytest.raises(ValueError, match=r"workers=2 .*colours.*expert_recipe.*workers: 1"):
        train_experts(bench, recipe, [23], ["colours"], workers=2, progress=False)
    assert train_experts(bench, recipe, [23], ["colours"], workers=1, progress=False) == 1
    assert bench.run_artifact("expert", ["colours"], replace(recipe, num_steps=CFG.num_steps + 1)).exists()


def test_a_level_written_as_an_integer_is_the_same_setting_and_its_rows_find_their_checkpoints(bench):
    """`data_fraction: [0.5, 1]` in a parameter file: the run of 1 trains under the key of 1.0, so the sweep's table
    rows (floats) find its checkpoint, and `weight_decay: 0` is the key of 0.0 (it was another key, trained again)."""
    from mergelab.training.sweep import row_config

    assert FinetuneConfig(weight_decay=0, data_fraction=1) == FinetuneConfig(weight_decay=0.0, data_fraction=1.0)
    assert isinstance(FinetuneConfig(lr=1).lr, float)
    cfgs = config_grid(replace(CFG, seed=12), data_fraction=[0.5, 1])
    table = sweep(bench, cfgs, ["colours"], probe_size=2, progress=False)
    for _, row in table.iterrows():
        assert len(checkpoint_log(bench, "colours", row_config(row))["loss"]) == CFG.num_steps
    assert sweep(bench, [replace(CFG, seed=12, data_fraction=1.0)], ["colours"], probe_size=2,
                 progress=False).attrs["runs_trained"] == 0


def test_rows_of_runs_with_and_without_a_frozen_stem_find_their_own_checkpoints(bench):
    """A table that mixes a run holding ``conv1`` and one that does not: each row's recipe is its own (the
    whole-model row has no ``frozen`` of its own in the table), and only the frozen run keeps the stem's bits."""
    from mergelab.training.sweep import checkpoint_state, row_config

    cfgs = [replace(CFG, seed=14), replace(CFG, seed=14, frozen=("conv1",))]
    table = sweep(bench, cfgs, ["colours"], probe_size=2, progress=False)
    rows = [row_config(row) for _, row in table.iterrows()]
    assert sorted(rows, key=lambda c: c.frozen) == cfgs
    pre = bench.pretrained_state()
    moved = {c.frozen: torch.equal(checkpoint_state(bench, "colours", c)["conv1.weight"], pre["conv1.weight"])
             for c in rows}
    assert moved == {(): False, ("conv1",): True}
    assert checkpoint_log(bench, "colours", cfgs[1])["finetune"]["frozen"] == ["conv1"]
    assert "frozen" not in checkpoint_log(bench, "colours", cfgs[0])["finetune"]
