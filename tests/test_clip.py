"""The ``clip`` size on the CPU, offline: synthetic datasets in every documented layout, random models.

A laptop-sized open_clip CLIP (``mergelab-tiny-ViT-32``) covers the interface quickly; one test runs
the whole path (heads, fine-tuning, import, merge, evaluation) on a randomly initialized ViT-B-32, and
every notebook runs unchanged at the ``clip_smoke`` profile.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import shutil
import sys
import time
import traceback
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mergelab
from mergelab.params import profile_params
from mergelab.benchmarks.clip import (PUBLIC_RECIPE, TASKS, TINY_MODEL, CheckpointError, ClipBenchmarkConfig,
                           DatasetNotFoundError, WeightsNotFoundError)
from mergelab.benchmarks.clip import benchmark as clip_benchmark
from mergelab.benchmarks.clip import training as clip_training
from mergelab.benchmarks.clip import datasets as ds
from mergelab.benchmarks.clip.checkpoints import load_expert, read_checkpoint
from mergelab.benchmarks.clip.model import ClipModelConfig, create_clip
from mergelab.benchmarks.clip.synthetic import CARS_SYNTHETIC, SUN397_SYNTHETIC, write_synthetic_datasets
from mergelab.analysis.generalization import measure_merge
from mergelab.analysis.stability import ExpertHyperparameters
from mergelab.experiments.ch01_stability import ExpertGrid, HYPERPARAMETERS
from mergelab.merging.sparsify import kth_smallest_magnitude, ties_threshold
from mergelab.task_vectors import TaskVector
from mergelab.training import finetune
from mergelab.training.sweep import checkpoint_log, checkpoint_state, sweep
from mergelab.training.trajectories import _spread_schedule, epoch_trajectory, gradient_descent_config, multitask_epoch_trajectory, trajectory_config
from mergelab.notebook import for_size, stand_in_note

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
TINY = {"name": TINY_MODEL, "pretrained": None}
CLIP_ENV = ("MERGELAB_CLIP_DATA_ROOT", "MERGELAB_CLIP_EXPERTS_DIR", "MERGELAB_CLIP_WEIGHTS_DIR")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """A private data cache for the module; no clip environment variables from the user's shell."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("clip")
    mp.setenv("MERGELAB_DATA_DIR", str(tmp / "data"))
    for var in CLIP_ENV:
        mp.delenv(var, raising=False)
    yield tmp
    mp.undo()


@pytest.fixture(scope="module")
def root(env: Path) -> Path:
    """All 8 tasks, written as tiny synthetic datasets in their documented layouts."""
    return write_synthetic_datasets(env / "datasets")


def tiny_bench(root: Path, tasks=("MNIST", "EuroSAT"), **data):
    return mergelab.load_benchmark(
        "clip", device="cpu", progress=False, tasks=list(tasks), pretrain={}, head_shots=None, model=dict(TINY),
        data={"root": str(root), "num_workers": 0, "eval_batch_size": 8, "max_val": 4, "max_test": 6, **data})


# ------------------------------------------------------------------------------------------ data
def test_every_documented_layout_loads_with_the_split_rules(root):
    authored = {"DTD": ds.DTD_CLASSES, "EuroSAT": ds.EUROSAT_CLASSES, "GTSRB": ds.GTSRB_CLASSES,
                "MNIST": ds.DIGITS, "RESISC45": ds.RESISC45_FOLDERS, "SVHN": ds.DIGITS}
    expected_classes = {t: len(v) for t, v in authored.items()} | {"Cars": len(CARS_SYNTHETIC),
                                                                   "SUN397": len(SUN397_SYNTHETIC)}
    # official pool sizes written by the synthetic writer (6 train + 4 test per class; DTD adds 1 official
    # val image per class to train, RESISC45 trains on its train file only; EuroSAT holds out 10 % of each
    # class's 10 images as test and 10 % as val)
    expected_pools = {"Cars": (24, 16), "DTD": (28, 16), "EuroSAT": (80, 10), "GTSRB": (24, 16),
                      "MNIST": (60, 40), "RESISC45": (24, 16), "SUN397": (30, 20), "SVHN": (60, 40)}
    for task in TASKS:
        source = ds.load_source(task, root)
        assert len(source.class_names) == expected_classes[task], task
        assert (len(source.train.indices), len(source.test.indices)) == expected_pools[task], task
        n = len(source.train.indices)
        sizes = {s: len(ds.make_split(source, s)) for s in ds.SPLITS}
        if task == "EuroSAT":  # a fixed val split, as in the public code
            assert sizes["val"] == 10 and sizes["train"] == n, sizes
        else:
            assert sizes["val"] == min(int(0.1 * n), 5000) and sizes["train"] + sizes["val"] == n, task
        for split in ds.SPLITS:
            d = ds.make_split(source, split)
            assert d.labels.min() >= 0 and d.labels.max() < len(source.class_names), (task, split)
            image, label = d[0]
            assert isinstance(image, Image.Image) and label == d.labels[0]
    assert ds.load_source("SUN397", root).class_names[1] == "apartment building outdoor"
    assert ds.load_source("Cars", root).class_names == CARS_SYNTHETIC
    # GTSRB labels are the class ids of the folders, not their rank among the folders present
    assert set(ds.load_source("GTSRB", root).train.labels.tolist()) == {0, 14, 28, 42}


def test_an_image_written_again_in_place_makes_a_new_fingerprint_and_a_moved_data_root_keeps_it(tmp_path):
    """Cache keys of the clip size (experts, evaluations) carry the split's fingerprint. Besides labels and
    indices it reads each file's size and modification time: a test image replaced in place under the same name
    and label is new data for the test split only; a data root moved elsewhere is the same data."""
    root = write_synthetic_datasets(tmp_path / "a")

    def prints(where: Path) -> dict[tuple[str, str], str]:
        out = {}
        for task in TASKS:
            source = ds.load_source(task, where)
            out.update({(task, s): ds.make_split(source, s).fingerprint() for s in ("train", "test")})
        return out

    before = prints(root)
    assert prints(root) == before  # read again: the same
    moved = tmp_path / "b"
    root.rename(moved)
    assert prints(moved) == before  # neither the paths nor the root enter it
    for task in TASKS:
        test = ds.make_split(ds.load_source(task, moved), "test")
        if test.files is not None:  # one image per example: rewrite the first test image with other pixels
            with Image.open(test.files[0]) as img:
                pixels = np.asarray(img.convert("RGB"))
            Image.fromarray(255 - pixels).save(test.files[0], format=img.format)
        else:  # MNIST, SVHN: the split's images live in one or two files, written again
            assert test.data_files, task
            Path(test.data_files[0]).write_bytes(Path(test.data_files[0]).read_bytes())
    after = prints(moved)
    for task in TASKS:
        assert after[task, "test"] != before[task, "test"], task
        assert after[task, "train"] == before[task, "train"], task  # the other split keeps its caches


@pytest.mark.parametrize("n", [7, 27, 1000, 60_000])
def test_validation_split_is_the_public_rule(n):
    train, val = ds.train_val_split(n)
    n_val = min(int(0.1 * n), 5000)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
    ref_train, ref_val = torch.utils.data.random_split(range(n), [n - n_val, n_val],
                                                       generator=torch.Generator().manual_seed(0))
    assert train.tolist() == list(ref_train.indices) and val.tolist() == list(ref_val.indices)


def test_missing_or_misplaced_data_gives_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    for task in TASKS:
        with pytest.raises(DatasetNotFoundError) as info:
            ds.load_source(task, empty)
        msg = str(info.value)
        assert str(empty) in msg and "Expected layout" in msg and "How to get it" in msg, msg
    with pytest.raises(DatasetNotFoundError, match="DATA=/path"):
        ds.load_source("MNIST", tmp_path / "nowhere")
    monkeypatch.delenv("MERGELAB_CLIP_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError, match="MERGELAB_CLIP_DATA_ROOT"):
        clip_benchmark.ClipDataConfig().resolve_root()
    # a file torchvision cannot read: our message, no traceback from inside torchvision
    (tmp_path / "svhn").mkdir()
    for split in ("train", "test"):
        (tmp_path / "svhn" / f"{split}_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetNotFoundError) as info:
        ds.load_source("SVHN", tmp_path)
    assert "torchvision could not read it" in str(info.value) and info.value.__suppress_context__
    assert not any("torchvision" in frame.filename for frame in traceback.extract_tb(info.value.__traceback__))
    # a class folder that is not one of the task's classes
    for name in ("Forest", "Jungle"):
        (tmp_path / "eurosat" / "2750" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "eurosat" / "2750" / name / "x.jpg")
    with pytest.raises(DatasetNotFoundError, match="Jungle.*AnnualCrop"):
        ds.load_source("EuroSAT", tmp_path)


def test_bad_parameters_name_what_is_valid(env):
    with pytest.raises(ValueError, match="valid: Cars, DTD"):
        ClipBenchmarkConfig.from_params(tasks=["MNIST", "ImageNet"])
    with pytest.raises(ValueError, match="'n_train' is not valid.*valid: root, synthetic"):
        ClipBenchmarkConfig.from_params(data={"n_train": 5})
    with pytest.raises(ValueError, match="pretrain"):
        ClipBenchmarkConfig.from_params(pretrain={"num_steps": 4})
    with pytest.raises(ValueError, match="head_shots"):
        ClipBenchmarkConfig.from_params(head_shots=8)
    with pytest.raises(ValueError, match=r"tasks='MNIST' is not valid; give a list of task names, e.g. \['MNIST'\]"):
        ClipBenchmarkConfig.from_params(tasks="MNIST")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        mergelab.load_benchmark("clip", model={"name": "ViT-Nope"})
    with pytest.raises(ValueError, match="not a tag of 'ViT-B-32'.*openai"):
        mergelab.load_benchmark("clip", model={"name": "ViT-B-32", "pretrained": "no-such-tag"})
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        mergelab.load_benchmark("clip", model={"pretrained": str(env / "missing" / "weights.pt")})
    with pytest.raises(ValueError, match="valid: tiny, clip"):
        mergelab.load_benchmark("imagenet")


def test_unreachable_weights_name_the_cache_and_the_source(tmp_path, monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsNotFoundError) as info:
        create_clip(ClipModelConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path / "w")))
    msg = str(info.value)
    assert str(tmp_path / "w") in msg and "openai" in msg and "vit_base_patch32_clip_224.openai" in msg
    assert "internet" in msg and info.value.__suppress_context__


def test_a_random_clip_is_seeded_by_its_config_and_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = create_clip(ClipModelConfig(**TINY, init_seed=4))[0].state_dict()
    after = torch.rand(3)
    assert torch.equal(after, expected), "create_clip must not reseed the caller's random stream"
    again = create_clip(ClipModelConfig(**TINY, init_seed=4))[0].state_dict()
    other = create_clip(ClipModelConfig(**TINY, init_seed=5))[0].state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_public_recipe_and_profiles_agree():
    clip = profile_params("clip", "00_benchmark_and_baselines")
    smoke = profile_params("clip_smoke", "00_benchmark_and_baselines")
    assert set(clip) == set(smoke)
    assert mergelab.FinetuneConfig(**clip["finetune"], seed=clip["seed"]) == PUBLIC_RECIPE
    assert PUBLIC_RECIPE.lr == 1e-5 and PUBLIC_RECIPE.weight_decay == 0.1 and PUBLIC_RECIPE.batch_size == 128
    cfg = ClipBenchmarkConfig.from_params(tasks=clip["tasks"], data=clip["data"], model=clip["model"],
                                          pretrain=clip["pretrain"], head_shots=clip["head_shots"])
    assert cfg.tasks == TASKS and cfg.model.name == "ViT-B-32" and cfg.model.pretrained == "openai"


# ------------------------------------------------------------------------------------------ model
def test_heads_splits_and_cached_evaluation(root, monkeypatch):
    bench = tiny_bench(root)
    heads = bench.heads
    assert set(heads) == {"MNIST", "EuroSAT"}
    assert tuple(heads["MNIST"].weight.shape) == (10, 64)
    assert torch.allclose(heads["EuroSAT"].weight.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert heads["MNIST"].logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # exp(log(1/0.07)) of a fresh CLIP
    images, y = bench.split("EuroSAT", "train")
    assert len(images) == len(y) == 80 and images[:3].shape == (3, 3, 224, 224)  # EuroSAT's fixed train split
    raw = bench.raw_images("MNIST", "test")[:2]
    assert raw.shape == (2, 3, 224, 224) and 0 <= float(raw.min()) and float(raw.max()) <= 1
    assert len(bench.split("MNIST", "test")[1]) == 6  # max_test
    assert bench.class_names("EuroSAT")[0] == "annual crop land"  # the public name

    pretrained = bench.pretrained_state()
    acc = bench.evaluate(pretrained, "val")
    loss = bench.evaluate_loss(pretrained, "val")
    assert set(acc) == {"MNIST", "EuroSAT"} and all(0 <= a <= 1 for a in acc.values())
    assert all(math.isfinite(v) and v > 0 for v in loss.values())

    # a second benchmark reads the pretrained tower, heads and evaluations from the cache
    monkeypatch.setattr(clip_benchmark, "zero_shot_weights", lambda *a, **k: pytest.fail("heads rebuilt"))
    again = tiny_bench(root)
    assert torch.equal(again.heads["MNIST"].weight, heads["MNIST"].weight)
    assert all(torch.equal(v, pretrained[k]) for k, v in again.pretrained_state().items())
    monkeypatch.setattr(again, "_eval_batches", lambda *a, **k: pytest.fail("evaluated again"))
    assert again.evaluate(pretrained, "val") == acc

    # val images kept decoded in RAM give the same numbers as streaming them from disk
    kept = tiny_bench(root, eval_cache_gb=1.0, eval_batch_size=3)
    state = {k: v * 1.01 for k, v in pretrained.items()}
    streamed = bench.evaluate_loss(state, "val")
    shutil.rmtree(kept.cache_dir / "eval")
    first = kept.evaluate_loss(state, "val")
    assert set(kept._image_cache) == {("MNIST", "val"), ("EuroSAT", "val")}
    shutil.rmtree(kept.cache_dir / "eval")
    second = kept.evaluate_loss(state, "val")
    for t in streamed:
        assert first[t] == pytest.approx(streamed[t], rel=1e-5) and second[t] == pytest.approx(streamed[t], rel=1e-5)


def test_evaluate_equals_a_hand_computed_accuracy_with_each_tasks_head_and_split(root):
    """As at the tiny size (``tests/test_benchmark.py``): ``ln_post`` with zero gain and a chosen bias
    makes every image's feature one class embedding of the task's own text head, so the tower answers
    that class for every image, and its accuracy is that label's share of the requested split."""
    bench = tiny_bench(root)
    from conftest import answer_state

    pretrained = bench.pretrained_state()
    for task in bench.tasks:
        head = bench.heads[task]
        for split in ("val", "test"):
            y = torch.as_tensor(bench.split(task, split)[1])
            answer = int(y.max())  # a label the split holds (the splits are a few images), not class 0 if it can
            state = answer_state(pretrained, head.weight[answer])
            expected = float((y == answer).double().mean())
            assert 0 < expected < 1 or len(set(y.tolist())) == 1
            assert bench.evaluate(state, split, [task]) == {task: pytest.approx(expected)}, (task, split)


def test_responses_agree_with_evaluate_and_follow_the_data(root):
    """Per-example responses (chapters 03 and 05) and losses (chapter 01) give each task the accuracy (and
    loss) evaluate gives, and a split of
    another size is another cache file (the clip benchmark's own key names the model alone)."""
    from mergelab.analysis.responses import ResponseEvaluator

    bench = tiny_bench(root)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in bench.pretrained_state().items()}
    from mergelab.analysis.generalization import per_example_losses

    for split in ("val", "test"):
        ev = ResponseEvaluator(bench, split=split)
        accuracy = bench.evaluate(state, split)
        assert ev.per_task_accuracy(ev.full(state)) == pytest.approx(accuracy, abs=0), split
        for task in bench.tasks:  # chapter 01's per-example losses: the same answers and mean loss
            X, y = bench.split(task, split)
            losses, correct = per_example_losses(bench, state, task, bench.images(task, split, range(len(y))),
                                                 torch.as_tensor(y))
            assert float(correct.double().mean()) == accuracy[task], (task, split)
            assert float(losses.double().mean()) == pytest.approx(bench.evaluate_loss(state, split, [task])[task],
                                                                  rel=1e-5)
    smaller = tiny_bench(root, max_val=3)
    assert ResponseEvaluator(smaller, split="val")._cache_path(state) != ResponseEvaluator(
        bench, split="val")._cache_path(state)
    assert ResponseEvaluator(smaller, split="val").num_items == 2 * 3


def test_diagnostics_read_features_in_the_precision_evaluate_uses(root):
    """Chapter 00's diagnostics (zero-shot calibration, linear probe, margins) encode through eval_features: with
    model.precision bf16 (here on the CPU's autocast) their features are the bf16 ones evaluate scores with."""
    from mergelab.analysis import diagnostics

    bench = tiny_bench(root)
    X = bench.images("MNIST", "val", range(4))
    enc = bench.new_encoder(bench.pretrained_state())
    fp32 = diagnostics._encode(bench, enc, X)
    with torch.no_grad():  # as every evaluation runs (open_clip's attention takes its fused path there)
        assert torch.equal(fp32, bench.eval_features(enc.eval(), X))
    bench.amp = torch.bfloat16  # what model.precision bf16 resolves to
    bf16 = diagnostics._encode(bench, enc, X)
    with torch.no_grad():
        assert torch.equal(bf16, bench.eval_features(enc.eval(), X)) and not torch.equal(bf16, fp32)


def test_trajectories_are_keyed_by_the_training_data_and_precision_as_experts_are(root):
    """Chapter 02's trajectories at the clip size: other training data (a smaller max_train) or another precision
    is another run, as for the experts (the clip benchmark's own key names the model alone)."""
    from mergelab.training.trajectories import _trajectory_key

    cfg = mergelab.FinetuneConfig(num_steps=2, batch_size=4, warmup_steps=0)
    bench = tiny_bench(root)

    def keys(b):
        return (_trajectory_key(b, "epoch_trajectory", ["MNIST"], cfg, 2),
                _trajectory_key(b, "multitask_epoch_trajectory", ["EuroSAT", "MNIST"], cfg, 2),
                b.run_key("expert", ["MNIST"], cfg))

    assert keys(tiny_bench(root)) == keys(bench)  # the same benchmark: the same runs
    fewer = keys(tiny_bench(root, max_train=3))
    assert all(a != b for a, b in zip(fewer, keys(bench)))
    # another DataLoader worker count draws other augmentations: another expert, but the same trajectory (its
    # images are not augmented); another micro-batch (eval_batch_size) sums a trajectory's gradients in other
    # chunks: another trajectory, the same expert
    workers, micro = keys(tiny_bench(root, num_workers=2)), keys(tiny_bench(root, eval_batch_size=4))
    base = keys(bench)
    assert workers[:2] == base[:2] and workers[2] != base[2]
    assert all(a != b for a, b in zip(micro[:2], base[:2])) and micro[2] == base[2]
    bench.amp = torch.bfloat16  # model.precision bf16, as a GPU resolves auto
    assert all(a != b for a, b in zip(keys(bench), keys(tiny_bench(root))))


def test_zero_shot_heads_are_keyed_by_the_device_their_text_tower_ran_on(root, monkeypatch):
    bench = tiny_bench(root)
    on_cpu = bench._head_key("MNIST")
    monkeypatch.setattr(bench, "device", torch.device("cuda"), raising=False)  # built on a GPU: other last bits
    assert bench._head_key("MNIST") != on_cpu


def test_image_subsets_are_decoded_once_and_equal_the_lazy_view(root, monkeypatch):
    
    bench = tiny_bench(root, eval_cache_gb=1.0, eval_batch_size=3)
    view, _ = bench.split("MNIST", "train")
    idx = torch.tensor([7, 0, 3, 11])
    first = bench.images("MNIST", "train", idx)
    assert first.shape == (4, 3, 224, 224) and torch.equal(first, view[idx])  # the evaluation transform's values
    cfg = mergelab.FinetuneConfig(data_fraction=0.5, num_steps=1, warmup_steps=0)
    state = bench.pretrained_state()
    measured = measure_merge(bench, state, {"MNIST": cfg}, max_examples=5, probe_size=2)
    with monkeypatch.context() as mp:  # what was decoded once is not decoded again
        mp.setattr(ds.TaskSplit, "__getitem__", lambda *a, **k: pytest.fail("an image decoded again"))
        assert torch.equal(bench.images("MNIST", "train", idx), first)
        assert measure_merge(bench, state, {"MNIST": cfg}, max_examples=5, probe_size=2) == measured
    # without room in the cache nothing is kept, and the images are still right
    small = tiny_bench(root, eval_cache_gb=0.0)
    assert torch.equal(small.images("EuroSAT", "test", [2, 1]), small.split("EuroSAT", "test")[0][[2, 1]])
    assert small._subset_cache == {} and small.images("MNIST", "train", []).shape == (0, 3, 224, 224)


def test_clip_finetuning_leaves_the_callers_random_stream_alone(root):
    """The clip loop seeds torch from the run's configuration (its augmentations and loader draw from the global
    stream); the caller's stream goes on where it was."""
    bench = tiny_bench(root, tasks=("MNIST",))
    enc = bench.new_encoder(bench.pretrained_state())
    bench.head("MNIST")  # built before: its own seeded tower is not what this checks
    cfg = mergelab.FinetuneConfig(optimizer="sgd", lr=0.01, batch_size=4, num_steps=2, schedule="constant",
                                  warmup_steps=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    clip_training.finetune_encoder(bench, enc, ["MNIST"], cfg, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_the_clip_loop_keeps_a_frozen_patch_stem_and_names_what_could_be_frozen(root):
    """``frozen`` holds at the clip size as at tiny (its own loop): ``conv1`` keeps its bits, the rest moves, and
    every parameter trains again afterwards."""
    bench = tiny_bench(root, tasks=("MNIST",))
    pre = bench.pretrained_state()
    enc = bench.new_encoder(pre)
    cfg = mergelab.FinetuneConfig(optimizer="adamw", lr=0.01, batch_size=4, num_steps=2, schedule="constant",
                                  warmup_steps=0, weight_decay=0.1, frozen=["conv1"])
    clip_training.finetune_encoder(bench, enc, ["MNIST"], cfg, progress=False)
    after = enc.state_dict()
    assert torch.equal(after["conv1.weight"], pre["conv1.weight"]) and not torch.equal(after["proj"], pre["proj"])
    assert all(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match=r"frozen=\['patch_embed'\] has 'patch_embed', which is no parameter.*conv1"):
        clip_training.finetune_encoder(bench, enc, ["MNIST"], replace(cfg, frozen=("patch_embed",)), progress=False)


def test_finetuning_resumes_where_it_stopped(root, tmp_path, monkeypatch):
    cfg = mergelab.FinetuneConfig(optimizer="adamw", lr=1e-3, batch_size=4, num_steps=4, warmup_steps=1,
                                  weight_decay=0.1, seed=3)
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "straight"))
    straight = tiny_bench(root).expert("MNIST", cfg)

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "resumed"))
    bench = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["MNIST"], model=dict(TINY),
                                    data={"root": str(root), "num_workers": 0}, checkpoint_every=2)
    real_lr_at = clip_training.lr_at

    class Interrupted(Exception):
        pass

    def interrupt_at_step_3(step, c):
        if step == 3:
            raise Interrupted
        return real_lr_at(step, c)

    monkeypatch.setattr(clip_training, "lr_at", interrupt_at_step_3)
    with pytest.raises(Interrupted):
        bench.expert("MNIST", cfg)
    partial = list(bench.experts_dir.glob("*.partial.pt"))
    assert len(partial) == 1 and torch.load(partial[0], weights_only=True)["step"] == 2
    monkeypatch.setattr(clip_training, "lr_at", real_lr_at)
    resumed = bench.expert("MNIST", cfg)
    log = bench.expert_log("MNIST", cfg)
    assert log["resumed_at_step"] == 2 and len(log["loss"]) == 4
    assert not list(bench.experts_dir.glob("*.partial.pt"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not torch.equal(resumed["proj"], bench.pretrained_state()["proj"])


def _fake_release_module():
    """A stand-in for the public code's ``src.modeling`` module, which is not installed here."""
    mod = types.ModuleType("fake_release_modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    ImageEncoder.__module__ = mod.__name__
    ImageEncoder.__qualname__ = "ImageEncoder"
    mod.ImageEncoder = ImageEncoder
    return mod


def test_import_of_saved_experts_and_refusal_of_other_architectures(root, tmp_path, monkeypatch):
    bench = tiny_bench(root, tasks=("MNIST", "EuroSAT", "GTSRB"))
    pre = bench.pretrained_state()
    fake = {t: {k: v + 0.01 * (i + 1) for k, v in pre.items()} for i, t in enumerate(bench.tasks)}
    folder = tmp_path / "experts"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(fake["MNIST"], str(folder / "MNIST.safetensors"))  # a plain image-tower state dict
    (folder / "EuroSATVal").mkdir()  # a whole-CLIP state dict, nested, in the released layout
    torch.save({"state_dict": {**{f"model.visual.{k}": v for k, v in fake["EuroSAT"].items()},
                               "model.text_projection": torch.zeros(64, 64)}},
               folder / "EuroSATVal" / "nonlinear_finetuned.pt")
    # a pickled whole module whose class this environment cannot import
    mod = _fake_release_module()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    clip_model = create_clip(ClipModelConfig(**TINY))[0]
    clip_model.visual.load_state_dict(fake["GTSRB"])
    (folder / "gtsrb").mkdir()
    torch.save(mod.ImageEncoder(clip_model), folder / "gtsrb" / "finetuned.pt")
    monkeypatch.delitem(sys.modules, mod.__name__)

    with pytest.raises(CheckpointError, match="gtsrb.*allow_pickle: true"):
        bench.import_experts(folder)  # the pickle is not unpickled unless asked
    trusting = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=list(bench.tasks), model={
        **TINY, "allow_pickle": True}, data={"root": str(root), "num_workers": 0})
    imported = trusting.import_experts(folder)
    for t in bench.tasks:
        assert all(torch.equal(imported[t][k], fake[t][k]) for k in pre), t

    via_params = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["MNIST"], model={
        **TINY, "experts_dir": str(folder)}, data={"root": str(root), "num_workers": 0})
    assert torch.equal(via_params.expert("MNIST")["proj"], fake["MNIST"]["proj"])
    assert via_params.expert_log("MNIST")["kind"] == "imported"

    wrong = dict(pre)
    wrong["proj"] = torch.zeros(64, 32)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"'proj' has shape \(64, 32\), expected \(64, 64\)"):
        load_expert(tmp_path / "wrong.pt", pre)
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no ViT image tower"):
        load_expert(tmp_path / "other.pt", pre)
    with pytest.raises(CheckpointError, match=r"no checkpoint for task 'SVHN'.*SVHN\.safetensors"):
        bench.import_experts(folder, ["SVHN"])
    with pytest.raises(CheckpointError, match="does not exist"):
        bench.import_experts(tmp_path / "nowhere")
    assert set(read_checkpoint(folder / "MNIST.safetensors")) == set(pre)


def test_an_imported_eurosat_expert_is_refused_on_mergelab_s_own_split_and_read_on_the_public_one(root, tmp_path):
    """Experts fine-tuned elsewhere trained on the public EuroSAT_splits/train; without that folder EuroSAT is split
    here by a rule of its own, whose test images the imported expert mostly trained on."""
    import shutil

    from safetensors.torch import save_file

    pre = tiny_bench(root, tasks=("EuroSAT",)).pretrained_state()
    folder = tmp_path / "experts"
    folder.mkdir()
    save_file({k: v + 1.0 for k, v in pre.items()}, str(folder / "EuroSAT.safetensors"))
    importing = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["EuroSAT"], model={
        **TINY, "experts_dir": str(folder)}, data={"root": str(root), "num_workers": 0})
    with pytest.raises(ValueError, match=r"EuroSAT_splits is missing.*about 80 % of its test and validation images"
                                         r".*leave EuroSAT out of tasks, or unset model.experts_dir"):
        importing.expert("EuroSAT")
    # the public layout: three ImageFolders; the import is read
    public = tmp_path / "public"
    for i, split in enumerate(("train", "val", "test")):
        for cls in sorted((root / "eurosat" / "2750").iterdir()):
            (public / "EuroSAT_splits" / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[i::3]:
                shutil.copy(f, public / "EuroSAT_splits" / split / cls.name / f.name)
    reading = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["EuroSAT"], model={
        **TINY, "experts_dir": str(folder)}, data={"root": str(public), "num_workers": 0})
    assert torch.equal(reading.expert("EuroSAT")["proj"], pre["proj"] + 1.0)


@pytest.mark.timeout(600)
def test_whole_path_on_a_random_vit_b32(root, tmp_path, capsys):
    """Random ViT-B-32: zero-shot heads from its text tower, fine-tuning, import, merge, evaluation."""
    times = {}
    start = time.perf_counter()
    bench = mergelab.load_benchmark(
        "clip", device="cpu", progress=False, tasks=["MNIST", "EuroSAT"], pretrain={}, head_shots=None,
        model={"name": "ViT-B-32", "pretrained": None},
        data={"root": str(root), "max_train": 4, "max_val": 2, "max_test": 2, "num_workers": 0,
              "eval_batch_size": 4})
    pre = bench.pretrained_state()
    heads = bench.heads
    times["model and heads"] = time.perf_counter() - start
    assert len(pre) == 152 and sum(v.numel() for v in pre.values()) == 87_849_216
    assert tuple(pre["conv1.weight"].shape) == (768, 3, 32, 32)
    assert tuple(heads["MNIST"].weight.shape) == (10, 512) and tuple(heads["EuroSAT"].weight.shape) == (10, 512)

    start = time.perf_counter()
    cfg = mergelab.FinetuneConfig(optimizer="adamw", lr=1e-5, batch_size=2, num_steps=1, warmup_steps=0,
                                  weight_decay=0.1, grad_clip=1.0)
    expert = bench.expert("MNIST", cfg)
    times["1 fine-tuning step (batch 2)"] = time.perf_counter() - start
    assert any(not torch.equal(expert[k], pre[k]) for k in pre)

    start = time.perf_counter()
    folder = tmp_path / "experts"
    folder.mkdir()
    torch.save({"state_dict": {f"visual.{k}": v for k, v in expert.items()}}, folder / "MNIST.pt")
    imported = bench.import_experts(folder, ["MNIST"])["MNIST"]
    assert all(torch.equal(imported[k], expert[k]) for k in pre)
    times["save and import"] = time.perf_counter() - start

    start = time.perf_counter()
    merged = mergelab.merge("task_arithmetic", pre, [TaskVector.from_states(pre, imported)], coefficient=0.5)
    times["merge"] = time.perf_counter() - start
    start = time.perf_counter()
    acc = bench.evaluate(merged, "val")
    times["evaluate (2 tasks x 2 images)"] = time.perf_counter() - start
    assert set(acc) == {"MNIST", "EuroSAT"} and all(0 <= a <= 1 for a in acc.values())
    with capsys.disabled():
        print("\nrandom ViT-B-32 on CPU: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def test_kth_smallest_magnitude_is_exact():
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        tensors = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g)
                   * 10.0 ** float(torch.randint(-6, 2, (1,), generator=g)) for _ in range(3)]
        tensors[0][:4] = 0.0
        tensors[1][:3] = tensors[1][3]
        if trial % 4 == 0:
            tensors[2].zero_()  # heavy ties
        flat = torch.cat([t.abs() for t in tensors])
        for k in (1, flat.numel(), int(torch.randint(1, flat.numel() + 1, (1,), generator=g))):
            assert kth_smallest_magnitude(tensors, k) == float(flat.kthvalue(k).values), (trial, k)
    tv = TaskVector({"a": torch.randn(50, 20, generator=g), "b": torch.randn(77, generator=g)})
    kept = sum(int((v.abs() > ties_threshold(tv, 0.3)).sum()) for v in tv.vector.values())
    assert kept == round(0.3 * tv.numel())


def test_streaming_benchmark_agrees_with_the_naive_merge(env, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "perf"))  # the memory tool lives beside the benchmarks
    spec = importlib.util.spec_from_file_location("bench_streaming_merge", ROOT / "perf/bench_streaming_merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pretrained, tvs = bench.build_inputs(TINY_MODEL, 3)
    for method, options in (("task_arithmetic", {"coefficient": 0.3}), ("ties", {"coefficient": 1.0, "density": 0.2})):
        streamed = mergelab.merge(method, pretrained, tvs, **options)
        naive = bench.naive_merge(method, pretrained, tvs, **options)
        assert all(torch.allclose(streamed[k], naive[k], atol=1e-6) for k in pretrained), method
    row = bench.run_worker(TINY_MODEL, 2, "ties", "streaming")
    assert row["seconds"] > 0 and row["peak_gb"] > 0 and row["n_params"] == sum(v.numel() for v in pretrained.values())


# ------------------------------------------------------------------------------------------ shared interface
def test_sweep_checkpoints_are_the_shorter_runs_and_win_over_imported_experts(root, tmp_path, monkeypatch):
    """A sweep trains through the benchmark's own loop: its checkpoint after s steps is the s-step run."""
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    bench = tiny_bench(root, tasks=("MNIST",))
    cfg = mergelab.FinetuneConfig(optimizer="sgd", lr=0.01, batch_size=4, num_steps=3, schedule="constant",
                                  warmup_steps=0, momentum=0.9, grad_clip=1.0, data_fraction=0.5)
    # threads=None: the thread count of this process (another test may have raised it), as for `alone` below
    table = sweep(bench, [cfg], ["MNIST"], steps=[2, 3], probe_size=2, progress=False, threads=None)
    assert len(table) == 2 and table["trained"].all()
    short = replace(cfg, num_steps=2)
    log = checkpoint_log(bench, "MNIST", short)
    assert log["benchmark"] == "clip" and len(log["batch_gradient_norm"]) == 2
    assert log["gradient_norm_probe"]["steps"] == [0, 2]  # at theta_0 and at the checkpoints up to this one
    alone = bench.new_encoder(bench.pretrained_state())
    bench.finetune_encoder(alone, ["MNIST"], short)
    swept = checkpoint_state(bench, "MNIST", short)
    assert all(torch.equal(swept[k], v) for k, v in alone.state_dict().items())
    assert all(torch.equal(bench.expert("MNIST", short)[k], swept[k]) for k in swept)
    # with experts imported from a folder, bench.expert returns the import whatever the recipe; the sweep's own stays
    from safetensors.torch import save_file

    folder = tmp_path / "experts"
    folder.mkdir()
    save_file({k: v + 1.0 for k, v in bench.pretrained_state().items()}, str(folder / "MNIST.safetensors"))
    importing = mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["MNIST"], model={
        **TINY, "experts_dir": str(folder)}, data={"root": str(root), "num_workers": 0, "eval_batch_size": 8,
                                                   "max_val": 4, "max_test": 6})
    assert not torch.equal(importing.expert("MNIST", short)["proj"], swept["proj"])
    assert torch.equal(checkpoint_state(importing, "MNIST", short)["proj"], swept["proj"])


def test_micro_batches_give_the_same_step_and_unequal_subsets_get_a_spread_multitask_epoch(root):
    bench = tiny_bench(root)  # MNIST has 54 training images, EuroSAT 80
    X, y = bench.split("MNIST", "train")
    cfg = gradient_descent_config(0.05, batch_size=40, seed=1)
    states = []
    for micro in (None, 16):
        enc = bench.new_encoder(bench.pretrained_state())
        finetune(enc, {"MNIST": (X, y)}, {"MNIST": bench.heads["MNIST"]}, cfg, progress=False, micro_batch_size=micro)
        states.append(enc.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-7)
    assert bench.micro_batch_size == 8

    K, active = _spread_schedule({"a": 6, "b": 10, "c": 10})
    assert K == 10 and [sum(active(t, s) for s in range(20)) for t in "abc"] == [12, 20, 20]
    assert _spread_schedule({"a": 5, "b": 5}) == (5, None)
    # small SGD steps: the experts' summed task vectors ~ the multi-task displacement, as with equal subsets
    pre = bench.pretrained_state()
    # batch 2 divides both training splits (54 and 80 images), so no example is left out of an epoch
    sgd = trajectory_config("sgd", 5e-6, batch_size=2)
    experts = {t: epoch_trajectory(bench, t, sgd, 1) for t in ("MNIST", "EuroSAT")}
    assert [experts[t].steps_per_epoch for t in ("MNIST", "EuroSAT")] == [27, 40]
    mt = multitask_epoch_trajectory(bench, ["MNIST", "EuroSAT"], sgd, 1)
    assert mt.steps_per_epoch == 40 and mt.n_train == 80 and len(mt.loss) == 40
    summed = sum(tr.task_vector(pre, 1) for tr in experts.values())
    tau_mt = mt.task_vector(pre, 1)
    assert (summed - tau_mt).norm() < 0.02 * tau_mt.norm()  # first order: the second-order drift is ~eta * k
    # MNIST at every one of the 40 steps would have added about half again its expert's update
    every_step = summed + 0.5 * experts["MNIST"].task_vector(pre, 1)
    assert (every_step - tau_mt).norm() > 0.1 * tau_mt.norm()


# ------------------------------------------------------------------------------------------ parameters
def parameter_names(name: str) -> list[str]:
    """Names assigned in the notebook's ``parameters`` cell."""
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return [t.id for node in ast.parse("".join(cell["source"])).body for t in node.targets]


@pytest.mark.parametrize("profile", ["clip", "clip_smoke"])
def test_every_notebook_has_parameters_at_the_clip_profiles(profile):
    """What ``make report PROFILE=clip|clip_smoke`` reads before running anything: a valid file per notebook."""
    from mergelab import report

    names = [nb.stem for nb in report.discover_notebooks()]
    assert names == NOTEBOOKS and len(names) >= 4
    params = {n: report.profile_params(profile, n) for n in names}
    first = params[names[0]]
    for name, values in params.items():
        assert set(values) == set(parameter_names(name)), name  # no unknown name papermill would inject silently
        assert values["profile"] == profile and values["benchmark"] == "clip", name
        # same data and model as chapter 0, so the tower, heads, evaluations and experts are shared
        assert values["data"] == first["data"] and values["model"] == first["model"], name
        if "tasks" not in values:  # chapter 06 trains its own single-task models; the 8 tasks do not apply
            assert name == "06_cycle_consistent_merging", name
            continue
        assert set(values["tasks"]) <= set(first["tasks"] if profile == "clip" else TASKS), name
        ClipBenchmarkConfig.from_params(tasks=values["tasks"], data=values["data"], model=values["model"],
                                        pretrain=values["pretrain"], head_shots=values["head_shots"])
        if "finetune" in values and name != "01_stability_bound":
            assert values["finetune"] == first["finetune"], name  # chapter 0's experts
    stab = params["01_stability_bound"]
    assert set(stab["task_pool"]) <= set(stab["tasks"]) and stab["merge_size"] <= len(stab["task_pool"])
    centre = mergelab.FinetuneConfig(**stab["finetune"], **stab["centre"], seed=stab["seeds"][0])
    grid = ExpertGrid(centre, {k: tuple(v) for k, v in stab["levels"].items()}, checkpoints=tuple(stab["checkpoints"]))
    for h in HYPERPARAMETERS:  # levels whose mean is the centre: heterogeneous vs homogeneous at equal means
        assert np.mean(stab["levels"][h]) == pytest.approx(stab["centre"][h])
        assert len(stab["levels"][h]) == 3 or (profile == "clip_smoke" and h == "num_steps")
    assert ExpertHyperparameters.from_config(grid.at(max(grid.steps)), 1000).momentum == 0.9  # the bound needs SGD
    grads = params["02_task_vectors_as_gradients"]
    assert set(grads["merge_learning_rates"]) <= set(grads["learning_rates"])
    assert all(grads["merge_learning_rates"][o] in grads["learning_rates"][o] for o in grads["merge_learning_rates"])
    assert max(grads["merge_epochs"]) <= grads["epochs"]
    # section 4's converged experts are chapter 00's: its merge tasks must be among chapter 00's tasks
    assert grads["merge_tasks"] and set(grads["merge_tasks"]) <= set(params["00_benchmark_and_baselines"]["tasks"])


def test_prose_for_each_size():
    assert for_size("clip", tiny="a", clip="\n    b\n      c\n").data == "b\n  c"
    with pytest.raises(ValueError, match="benchmark='imagenet' is not valid; use one of tiny, clip"):
        for_size("imagenet", tiny="a", clip="b")
    with pytest.raises(ValueError, match="one text per size"):
        for_size("tiny", tiny="a")
    assert stand_in_note("tiny", {}, {}) == "" and stand_in_note("clip", {"max_train": None}, {"pretrained": "openai"}) == ""
    smoke = profile_params("clip_smoke", "00_benchmark_and_baselines")
    note = stand_in_note("clip", smoke["data"], smoke["model"])
    assert "synthetic" in note and "randomly initialized" in note and "`max_train: 32`" in note


# ------------------------------------------------------------------------------------------ notebooks
def run_at_clip_smoke(name: str, tmp_path: Path) -> tuple[dict, str]:
    """Execute a notebook with ``params/clip_smoke``; return its results JSON and the Markdown it displayed."""
    from mergelab import paths, report

    params = report.profile_params("clip_smoke", name)
    reports = tmp_path / "reports"
    reports.mkdir()
    report.execute_notebook(paths.notebooks_dir() / f"{name}.ipynb", params, reports)
    executed = json.loads((reports / f"{name}.ipynb").read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    results = json.loads((reports / "results" / f"{name}.json").read_text())
    assert results["benchmark"] == "clip" and results["provenance"]["parameters"]["profile"] == "clip_smoke"
    from mergelab.report.claims import check_claims

    assert check_claims(name, results) is None  # checked: the claims stored follow from the numbers stored
    shown = "\n".join("".join(o["data"]["text/markdown"]) for o in outputs if "text/markdown" in o.get("data", {}))
    return results, shown


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_00_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, shown = run_at_clip_smoke("00_benchmark_and_baselines", tmp_path)
    assert results["tasks"] == ["MNIST", "EuroSAT"]
    methods = results["methods"]
    assert {"zero_shot", "experts", "multitask", "weight_averaging", "task_arithmetic", "ties", "dare"} <= set(methods)
    for m in methods.values():
        assert set(m["per_task_accuracy"]) == {"MNIST", "EuroSAT"}
        assert all(0 <= a <= 1 for a in m["per_task_accuracy"].values())
    assert methods["experts"]["normalized_accuracy"] == pytest.approx(1.0)
    # the prose describes the clip size, and says that this run's numbers mean nothing
    assert "CLIP's zero-shot head" in shown and "Stanford Cars" in shown and "mean nothing" in shown
    assert "generated from the seed" not in shown and "pretext task" not in shown


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_01_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, shown = run_at_clip_smoke("01_stability_bound", tmp_path)
    assert results["tasks"] == ["MNIST", "EuroSAT", "GTSRB"]
    assert results["experts"]["runs"] == 21 and results["experts"]["checkpoints"] == 21  # 7 recipes x 3 tasks, 1 step count
    merges = results["merges"]
    assert {m["method"] for m in merges} == {"weight_averaging", "ties", "dare"}
    assert {m["kind"] for m in merges} == {"homogeneous", "heterogeneous"}
    for m in merges:
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["train_accuracy"] <= 1 and m["test_loss"] > 0
        if m["method"] == "weight_averaging":  # the bound is computed for plain averaging only
            assert m["bound_quadratic"] > 0 and m["bound_smooth"] > 0 and m["lipschitz"] > 0
    assert set(results["rank_correlation"]["quadratic"]) == {"overall", *HYPERPARAMETERS}
    curvature = results["constants"]["curvature"]  # each point once: theta_0, then every recipe's checkpoint
    assert [r["step"] for r in curvature if r["recipe"] == "centre"] == [0, 2]
    assert sorted(r["step"] for r in curvature) == [0] + [2] * 7  # a schedule per recipe: 7 recipes, 1 task
    assert all(math.isfinite(r["lambda_max"]) and r["lambda_max"] >= r["lambda_min"] for r in curvature)
    assert "SGD runs, not the public recipe's AdamW" in shown and "heads start confidently wrong" not in shown


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_02_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, _ = run_at_clip_smoke("02_task_vectors_as_gradients", tmp_path)
    assert results["tasks"] == ["MNIST", "EuroSAT"]
    # the one-step identity holds at this size too, with full batches forwarded in chunks of 16
    one = results["one_step_exactness"]
    assert one["float32"]["n_train"] == {"MNIST": 32, "EuroSAT": 32}
    for dtype, bound in (("float32", 1e-4), ("float64", 1e-12)):
        assert all(r["relative_error"] < bound for r in one[dtype]["per_task"].values()), dtype
        assert one[dtype]["task_arithmetic"]["relative_error"] < bound, dtype
    assert all(-1 - 1e-9 <= r["cosine"] <= 1 + 1e-9 for r in results["per_epoch_cosines"])
    assert results["merge_methods"] == ["task_arithmetic", "tsv_merge"]
    for by_method in results["merged_accuracy_by_epochs"].values():
        for by_epoch in by_method.values():
            assert set(by_epoch) == {"1", "2"}
            assert all(0 <= r["absolute_accuracy"] <= 1 for r in by_epoch.values())
    assert set(results["multitask_same_budget"]) == {"sgd", "adamw"}


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_03_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, _ = run_at_clip_smoke("03_task_singular_vectors", tmp_path)
    tasks = ["MNIST", "EuroSAT", "GTSRB"]
    assert results["tasks"] == tasks
    methods = results["methods"]
    assert set(methods) == {"zero_shot", "weight_averaging", "task_arithmetic", "ties", "tsv_merge",
                            "tsv_merge_validated", "tsv_compress", "experts"}
    for m in methods.values():
        assert set(m["per_task_accuracy"]) == set(tasks) and 0 <= m["absolute_accuracy"] <= 1
    assert methods["experts"]["normalized_accuracy"] == pytest.approx(1.0)
    compress = results["tsv_compress"]
    assert 0 < compress["storage_fraction"] and {r["rank_fraction"] for r in compress["sweep"]} == {0.25, 1.0}
    assert next(r for r in compress["sweep"] if r["rank_fraction"] == 1.0)["normalized_accuracy"] == pytest.approx(1.0)
    assert all(0 <= e <= 1 for e in results["energy_top_k"].values())
    assert len(results["interference"]["pairs"]) == 3  # every pair of the 3 tasks
    assert results["speed"]["relative_difference"] < 1e-3


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_04_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, _ = run_at_clip_smoke("04_mass_routing", tmp_path)
    tasks = ["MNIST", "EuroSAT", "GTSRB"]
    assert results["tasks"] == tasks
    methods = results["methods"]
    assert {"mass", "mass_oracle_head", "tsv_merge", "tsv_merge_validated", "tsv_compress", "experts"} <= set(methods)
    for m in methods.values():
        assert set(m["per_task_accuracy"]) == set(tasks) and 0 <= m["absolute_accuracy"] <= 1
    # the open_clip tower's layout was read per image, and routing ran over all three tasks
    assert results["routing_block"] == 1 and results["num_blocks"] == 2
    assert 0 <= results["routing"]["argmax_true"] <= results["routing_accuracy"] <= 1
    assert results["storage_multiple"] > 1 and results["time_per_image_ratio"] > 0
    assert {r["study"] for r in results["ablations"]} == {"layer", "selection", "first_pass"}


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_05_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, shown = run_at_clip_smoke("05_merge3_irt", tmp_path)
    assert results["tasks"] == ["MNIST", "EuroSAT"]
    # this profile calibrates the IRT model on the multi-task model too (tiny and clip do not): that path runs here
    assert mergelab.report.profile_params("clip_smoke", "05_merge3_irt")["population_multitask"] is True
    assert [m["role"] for m in results["population"] if m["kind"] == "multitask"] == ["calibration"]
    assert "multitask" in results["irt"]["endpoint_fit_by_task"]
    assert "The multi-task model (one of the calibration models)" in shown
    N = results["num_items"]
    assert N == 8  # max_val 4 images per task
    assert {"evolved_full", "evolved_irt", "task_arithmetic_grid"} <= set(results["methods"])
    for m in results["methods"].values():
        assert set(m["per_task_accuracy"]) == {"MNIST", "EuroSAT"}
    at_all = [r for r in results["estimator_errors"] if r["fraction"] == 1.0]
    assert at_all and all(r["mae"] == pytest.approx(0.0, abs=1e-12) for r in at_all)
    irt = results["methods"]["evolved_irt"]
    assert irt["fitness_forward_passes"] == irt["evaluations"] * results["evolution"]["fitness_items"]


@pytest.mark.notebook
@pytest.mark.timeout(900)
def test_notebook_06_runs_unchanged_at_the_clip_smoke_profile(env, tmp_path):
    results, shown = run_at_clip_smoke("06_cycle_consistent_merging", tmp_path)
    assert set(results["architectures"]) == {"mlp", "resnet", "vit"}
    for r in results["architectures"].values():
        assert all(0 <= m["accuracy"] <= 1 for m in r["methods"].values())
        assert r["cycle_errors"]["c2m3"]["mean"] == 0
    # the prose says the chapter does not apply to the 8-task benchmark and what a user would load
    assert "does not apply to the 8-task CLIP benchmark" in shown and "different initializations" in shown
    assert "ships with scikit-learn" not in shown


def test_experts_whose_release_starts_from_another_pretrained_model_are_refused(root, tmp_path):
    """A release keeps the pretrained model its experts were fine-tuned from (task vectors' zeroshot.pt, the TSV
    release's <Task>Val/nonlinear_zeroshot.pt): when it is not the benchmark's, every task vector would carry the
    difference, so the import stops and says by how much they differ."""
    import warnings

    from safetensors.torch import save_file

    from mergelab.benchmarks.clip.checkpoints import CheckpointError, check_release_base

    pre = tiny_bench(root, tasks=("MNIST",)).pretrained_state()
    folder = tmp_path / "release"
    (folder / "MNISTVal").mkdir(parents=True)
    torch.save({f"model.visual.{k}": v + 0.5 for k, v in pre.items()}, folder / "MNISTVal" / "nonlinear_finetuned.pt")

    def importing():
        return mergelab.load_benchmark("clip", device="cpu", progress=False, tasks=["MNIST"], model={
            **TINY, "experts_dir": str(folder)}, data={"root": str(root), "num_workers": 0})

    assert torch.equal(importing().expert("MNIST")["proj"], pre["proj"] + 0.5)  # no pretrained model beside it
    other = {k: v.clone() for k, v in pre.items()}
    other["proj"][0, 0] += 0.25
    torch.save({f"model.visual.{k}": v for k, v in other.items()}, folder / "MNISTVal" / "nonlinear_zeroshot.pt")
    with pytest.raises(CheckpointError, match=r"not this benchmark's: its image tower differs by up to 0\.25 "
                                              r"\(in 'proj'\).*model\.pretrained"):
        importing().expert("MNIST")
    torch.save({f"model.visual.{k}": v for k, v in pre.items()}, folder / "MNISTVal" / "nonlinear_zeroshot.pt")
    assert torch.equal(importing().expert("MNIST")["proj"], pre["proj"] + 0.5)  # the same start: imported
    # a pickled pretrained model is compared only where pickles are allowed; a warning says it was not
    (folder / "MNISTVal" / "nonlinear_zeroshot.pt").unlink()
    save_file(other, str(folder / "zeroshot.safetensors"))  # the folder's own, found after the task's
    with pytest.raises(CheckpointError, match="differs by up to 0.25"):
        check_release_base(folder, "MNIST", pre)
    (folder / "zeroshot.safetensors").unlink()
    torch.save(torch.nn.Linear(2, 2), folder / "zeroshot.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_release_base(folder, "MNIST", pre) is None
    assert any("was not compared" in str(w.message) and "allow_pickle" in str(w.message) for w in caught)
