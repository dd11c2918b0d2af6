"""The tiny benchmark end to end at a very small size: naming, caching, frozen heads, evaluation."""

from __future__ import annotations

import re

import pytest
import torch

import mergelab
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig
from mergelab.task_vectors import TaskVector
from mergelab.training import finetune

SMALL = dict(tasks=["colours", "size"], data={"n_train": 64, "n_val": 32, "n_test": 32, "n_pretext": 64},
             model={"width": 32, "layers": 2, "heads": 2}, pretrain={"num_steps": 2, "batch_size": 16, "warmup_steps": 1},
             head_shots=2)
FT = mergelab.FinetuneConfig(num_steps=3, batch_size=16, warmup_steps=1)


@pytest.fixture
def bench(data_dir) -> TinyBenchmark:
    return mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)


def _layer_pattern(key: str) -> str:
    return re.sub(r"resblocks\.\d+\.", "resblocks.N.", key)


def test_tiny_encoder_uses_vit_b32_parameter_names_and_kinds(bench):
    import open_clip

    big = open_clip.create_model("ViT-B-32", pretrained=None).visual.state_dict()
    tiny = bench.pretrained_state()
    assert {_layer_pattern(k) for k in tiny} == {_layer_pattern(k) for k in big}
    for k, v in tiny.items():
        assert v.ndim == big[k].ndim, k


def test_experts_are_cached_by_configuration(bench, data_dir, monkeypatch):
    first = bench.expert("colours", FT)
    files = sorted((data_dir / "experts").glob("expert-*"))
    assert [f.suffix for f in files] == [".json", ".safetensors"]
    calls = []
    monkeypatch.setattr("mergelab.benchmarks.tiny.benchmark.finetune", lambda *a, **k: calls.append(1))
    again = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL).expert("colours", FT)
    assert not calls
    for k in first:
        torch.testing.assert_close(first[k], again[k], rtol=0, atol=0)
    # another hyperparameter is another expert
    monkeypatch.setattr("mergelab.benchmarks.tiny.benchmark.finetune", finetune)
    bench.expert("colours", mergelab.FinetuneConfig(num_steps=3, batch_size=16, warmup_steps=1, lr=2e-3))
    assert len(list((data_dir / "experts").glob("expert-*.safetensors"))) == 2


def test_fine_tuning_changes_the_encoder_not_the_head(bench):
    head_before = bench.heads["size"].weight.clone()
    expert = bench.expert("size", FT)
    tv = TaskVector.from_states(bench.pretrained_state(), expert)
    assert tv.norm() > 0
    assert torch.equal(bench.heads["size"].weight, head_before)


def test_evaluations_are_cached_per_weights_and_equal_a_fresh_pass(bench, monkeypatch):
    """Chapters evaluate the same weights many times (every grid's 0 is the pretrained model, experts
    recur across chapters): the second time reads the result cached under the weights' digest."""
    from mergelab.utils import state_digest

    state = bench.pretrained_state()
    passes: list[tuple[str, str]] = []
    real = bench._evaluate_task
    monkeypatch.setattr(bench, "_evaluate_task", lambda enc, t, s: passes.append((t, s)) or real(enc, t, s))
    first = bench.evaluations(state, "val")
    assert passes == [("colours", "val"), ("size", "val")]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 and r["n"] == 32 for r in first.values())
    assert bench.evaluate(state, "val") == {t: r["accuracy"] for t, r in first.items()}
    assert bench.evaluate_loss(state, "val", ["size"]) == {"size": first["size"]["loss"]}
    # equal weights in another dict are the same model: read, not run again
    assert bench.evaluations({k: v.clone() for k, v in state.items()}, "val") == first and len(passes) == 2
    bench.evaluate(state, "test", ["size"])  # another split runs
    other = {**state, "ln_post.bias": state["ln_post.bias"] + 1.0}
    bench.evaluate(other, "val", ["size"])  # other weights run
    assert passes[2:] == [("size", "test"), ("size", "val")]
    # what the cache returns is what a fresh pass computes, bit for bit, on a new benchmark object
    fresh = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    path = fresh._eval_path(state_digest(state))
    assert path.is_file()
    path.unlink()
    assert fresh.evaluations(state, "val") == first
    path.write_text("{")  # an unreadable cache file (an interrupted write elsewhere) is evaluated again
    assert fresh.evaluations(state, "val") == first
    # the head is part of the key: other heads never read these results
    shots = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "heads": "shots"})
    assert shots._eval_key("size", "val") != bench._eval_key("size", "val")
    import copy  # and so is the device (a GPU's last bits may differ from the CPU's, and flip an argmax)
    on_gpu = copy.copy(bench)
    on_gpu.device = torch.device("cuda")
    assert on_gpu._eval_key("size", "val") != bench._eval_key("size", "val")
    with pytest.raises(ValueError, match="split='train2' is not valid; use one of"):
        bench.evaluate(state, "train2")


def test_an_evaluation_of_no_examples_is_refused_by_name(bench, monkeypatch):
    X, y = bench.split("size", "val")
    monkeypatch.setattr(bench, "split", lambda task, split="train": (X[:0], y[:0]))
    state = bench.pretrained_state()
    state["ln_post.bias"] = state["ln_post.bias"] + 0.123  # weights no other test has evaluated (not cached)
    with pytest.raises(ValueError, match="task 'size' split 'val' has no examples in TinyBenchmark's data"):
        bench.evaluate(state, "val", ["size"])


def test_same_seed_same_pretrained_weights(data_dir, tmp_path, monkeypatch):
    a = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL).pretrained_state()
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "other"))
    b = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL).pretrained_state()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_change_to_the_data_settings_is_another_encoder_other_experts_and_other_evaluations(bench):
    """The data settings (sizes of the splits and of the pretext pool) are in every cache key of the tiny
    size: other data never read an encoder, an expert or an evaluation made on these."""
    for change in ({"n_train": 48}, {"n_test": 24}, {"n_pretext": 48}):
        other = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "data": {**SMALL["data"], **change}})
        assert other.encoder_key != bench.encoder_key and other.cache_dir != bench.cache_dir, change
        assert other.key != bench.key, change
        assert other.run_key("expert", ["size"], FT) != bench.run_key("expert", ["size"], FT), change
        assert other._eval_key("size", "val") != bench._eval_key("size", "val"), change


def test_other_heads_reuse_the_pretrained_encoder_and_keep_their_experts_apart(bench, monkeypatch):
    pretrained = bench.pretrained_state()
    other = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "logit_scale": 10.0})
    shots = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "heads": "shots"})
    reseeded = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "pretrain": {**SMALL["pretrain"], "seed": 1}})

    def refuse(self):
        raise AssertionError(f"pretrained again for {self.config}")

    monkeypatch.setattr(TinyBenchmark, "_pretrain", refuse)
    for b in (other, shots):
        assert b.cache_dir == bench.cache_dir and b.key != bench.key
        for k, v in b.pretrained_state().items():
            torch.testing.assert_close(v, pretrained[k], rtol=0, atol=0)
    assert other.head_digest("size") != bench.head_digest("size")  # experts of the two are cached apart
    torch.testing.assert_close(other.heads["size"].weight, bench.heads["size"].weight, rtol=0, atol=0)
    assert other.heads["size"].logit_scale == 10.0
    assert run_key_differs(bench, other) and run_key_differs(bench, shots)
    # another pretraining (seed, data, model or pretraining settings) is another encoder
    assert reseeded.cache_dir != bench.cache_dir
    with pytest.raises(AssertionError, match="pretrained again"):
        reseeded.pretrained_state()


def run_key_differs(a: TinyBenchmark, b: TinyBenchmark) -> bool:
    return a.run_key("expert", ["size"], FT) != b.run_key("expert", ["size"], FT)


def test_bad_benchmark_parameters_get_clear_errors(data_dir):
    with pytest.raises(ValueError, match="benchmark='huge' is not available; valid: tiny"):
        mergelab.load_benchmark("huge")
    with pytest.raises(ValueError, match="task='cats' is not a tiny task"):
        TinyBenchmarkConfig.from_params(tasks=["cats"])
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=32"):
        TinyBenchmarkConfig.from_params(model={"patch_size": 5})
    # what a parameter file can hold that the size has no place for: named, with what would be valid
    with pytest.raises(ValueError, match=r"tasks='digits' is not valid; give a list of task names, e.g. \['digits'\]"):
        mergelab.load_benchmark("tiny", tasks="digits")
    with pytest.raises(ValueError, match=r"data parameter 'n_trian' is not valid for the tiny benchmark; valid: seed, n_train"):
        TinyBenchmarkConfig.from_params(data={"n_trian": 100})
    with pytest.raises(ValueError, match=r"benchmark parameter 'foo' is not valid for the tiny benchmark; valid: data, model"):
        mergelab.load_benchmark("tiny", foo=1)
    with pytest.raises(ValueError, match=r"model=\[32\] is not valid for the tiny benchmark; give a mapping"):
        TinyBenchmarkConfig.from_params(model=[32])
    with pytest.raises(ValueError, match="patch_size=0 is not valid; use a positive integer"):
        TinyBenchmarkConfig.from_params(model={"patch_size": 0})
    with pytest.raises(ValueError, match="heads='4' is not valid; use a positive integer"):
        TinyBenchmarkConfig.from_params(model={"heads": "4"})
    with pytest.raises(ValueError, match="mlp_ratio=0 is not valid; use a positive number"):
        TinyBenchmarkConfig.from_params(model={"mlp_ratio": 0})
    with pytest.raises(ValueError, match="head_shots=None is not valid; use a positive integer"):
        TinyBenchmarkConfig.from_params(head_shots=None)
    assert TinyBenchmarkConfig.from_params(tasks=None).tasks == TinyBenchmarkConfig().tasks  # null: every task


def test_loading_a_checkpoint_of_another_architecture_is_refused(bench):
    state = bench.pretrained_state()
    state["proj"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"parameter 'proj' has shape \(3, 3\)"):
        bench.evaluate(state)


def test_canonical_heads_are_built_from_clean_renderings_before_fine_tuning(bench, data_dir):
    from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE
    from mergelab.models import encode
    from mergelab.benchmarks.tiny.data import canonical_images

    assert bench.config.heads == "canonical" and bench.config.pretrain.objective == "factors"
    head = bench.heads["size"]
    assert head.weight.shape == (3, bench.config.model.output_dim)
    # the prototype of class c is the normalized mean feature of class c's canonical renderings
    enc = bench.new_encoder(bench.pretrained_state())
    imgs = torch.from_numpy(canonical_images("size"))
    feats = torch.nn.functional.normalize(encode(enc, (imgs.flatten(0, 1) - 0.5) / 0.25), dim=-1)
    expected = torch.nn.functional.normalize(feats.reshape(3, imgs.shape[1], -1).mean(1), dim=-1)
    assert torch.allclose(head.weight, expected, atol=1e-5)
    shots = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "heads": "shots"})
    assert not torch.allclose(shots.heads["size"].weight, head.weight)
    assert shots.head_digest("size") != bench.head_digest("size")  # experts of the two are cached apart
    with pytest.raises(ValueError, match="heads='prompts' is not valid; use one of canonical, shots"):
        TinyBenchmarkConfig(heads="prompts")
    assert TINY_RECIPE.lr <= bench.config.pretrain.lr / 4 and TINY_RECIPE.weight_decay > 0 and TINY_RECIPE.warmup_steps > 0


def test_the_rows_excluded_from_measured_training_loss_are_the_rows_the_heads_were_built_from(bench):
    """Chapter 01 measures training loss on the examples the experts saw, except those the frozen head
    was built from (:func:`mergelab.analysis.generalization.head_example_indices`). The rule is the
    benchmark's: canonical heads come from clean renderings and exclude nothing (a copy of the shots rule
    once dropped ``head_shots`` per class from the measurement); prototypes of shots heads are the
    normalized mean features of exactly the excluded rows, ``head_shots`` of each class."""
    from mergelab.analysis.generalization import head_example_indices
    from mergelab.models import encode

    assert bench.config.heads == "canonical"
    assert head_example_indices(bench, "size").numel() == 0
    shots = mergelab.load_benchmark("tiny", device="cpu", progress=False, **{**SMALL, "heads": "shots"})
    X, y = shots.split("size", "train")
    rows = head_example_indices(shots, "size")
    assert rows.dtype == torch.long and torch.equal(rows, shots.head_example_rows("size"))
    assert torch.bincount(y[rows], minlength=3).tolist() == [SMALL["head_shots"]] * 3
    assert len(set(rows.tolist())) == len(rows)
    enc = shots.new_encoder(shots.pretrained_state())
    feats = torch.nn.functional.normalize(encode(enc, X[rows]), dim=-1)
    expected = torch.stack([feats[y[rows] == c].mean(0) for c in range(3)])
    torch.testing.assert_close(shots.head_prototypes("size", enc), expected, rtol=0, atol=1e-6)
    # a benchmark without the rule (clip's text heads) excludes nothing
    assert head_example_indices(object(), "size").numel() == 0


def test_heads_and_diagnostic_features_are_computed_on_the_training_threads_whoever_calls(bench, monkeypatch):
    """The heads' digests are in every expert's cache key, and their prototypes' forward pass (autograd
    on) gives other last bits on two threads than on one: built on the caller's threads, a chapter run
    alone (two threads) trained other experts than the book (one). Heads and the diagnostics' features
    run on ``train_threads``, and the caller's setting comes back."""
    import mergelab.analysis.diagnostics as diagnostics
    import mergelab.benchmarks.tiny.benchmark as tiny
    from mergelab.models import encode

    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    monkeypatch.setattr(tiny, "encode", recording)
    monkeypatch.setattr(diagnostics, "encode", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench.heads
        X, _ = bench.split("size", "val")
        diagnostics._features(bench, bench.new_encoder(bench.pretrained_state()), X)
        diagnostics.zero_shot_calibration(bench, bench.pretrained_state(), "val")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {bench.train_threads} == {1}
    assert bench.heads_path().name == f"heads-canonical-threads1-encoder{bench.pretrained_sha256[:16]}.safetensors"
    assert bench.heads_path().is_file()


def test_evaluate_equals_a_hand_computed_accuracy_with_each_tasks_head_and_split(bench):
    """A model whose answer is known: ``ln_post`` with zero gain and a chosen bias makes every image's
    feature one constant, chosen as one class embedding of the task's own head, so the model answers
    that class for every image; its accuracy is the share of that label in the requested split."""
    from conftest import answer_state

    pretrained = bench.pretrained_state()
    for task in bench.tasks:
        head = bench.heads[task]
        answer = head.n_classes - 1  # not class 0, which a broken argmax over zeros would give
        state = answer_state(pretrained, head.weight[answer])
        for split in ("val", "test"):
            _, y = bench.split(task, split)
            expected = float((torch.as_tensor(y) == answer).double().mean())
            assert bench.evaluate(state, split, [task]) == {task: pytest.approx(expected)}
    assert set(bench.evaluate(pretrained, "test")) == set(bench.tasks)


def test_pretraining_with_the_tasks_unlabelled_images_never_reads_their_labels(data_dir, tmp_path, monkeypatch):
    """The tiny size's contrastive term (pretrain.unlabelled_weight > 0) draws the eight tasks' training
    images: the encoder is another one (its own cache), reproducible, and the same whatever the labels."""
    from mergelab.benchmarks.tiny import benchmark as tb

    params = {**SMALL, "pretrain": {**SMALL["pretrain"], "num_steps": 3, "unlabelled_weight": 0.5, "unlabelled_batch": 8}}
    plain = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    with_term = mergelab.load_benchmark("tiny", device="cpu", progress=False, **params)
    assert with_term.cache_dir != plain.cache_dir
    a = with_term.pretrained_state()
    assert any(not torch.equal(a[k], v) for k, v in plain.pretrained_state().items())

    read = []
    real = tb.load_task

    def garbage_labels(task, split, cfg=None):
        X, y = real(task, split, cfg)
        read.append((task, split))
        return X, y * 0 - 1  # every label replaced by -1: the term must not care

    monkeypatch.setattr(tb, "load_task", garbage_labels)
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "other"))
    b = mergelab.load_benchmark("tiny", device="cpu", progress=False, **params).pretrained_state()
    assert {t for t, _ in read} == set(mergelab.benchmarks.tiny.data.TASKS) and {s for _, s in read} == {"train"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_an_encoder_built_again_with_other_bits_gets_heads_and_run_keys_of_its_own(data_dir):
    """The heads are cached under the encoder file's SHA-256, not its configuration only: an encoder whose file
    was replaced at the same key (deleted and pretrained elsewhere, or by hand) gets new heads, and since the
    heads' digests key every run, new run keys, so no expert made from the old encoder is read for it."""
    from mergelab.cache import Artifact

    first = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    cfg = mergelab.FinetuneConfig(num_steps=2, batch_size=8, warmup_steps=0)
    digests, key = [first.head_digest(t) for t in first.tasks], first.run_key("expert", ["size"], cfg)
    path, sha = first.heads_path(), first.pretrained_sha256
    assert path.is_file()
    encoder = Artifact(first.cache_dir / "pretrained.safetensors")
    state = encoder.load()
    encoder.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, encoder.meta())
    again = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    assert again.encoder_key == first.encoder_key and again.pretrained_sha256 != sha
    assert again.heads_path() != path
    assert [again.head_digest(t) for t in again.tasks] != digests
    assert again.run_key("expert", ["size"], cfg) != key
    # the same bits again: the first heads, read from their file
    encoder.save(state, encoder.meta())
    third = mergelab.load_benchmark("tiny", device="cpu", progress=False, **SMALL)
    assert third.heads_path() == path and [third.head_digest(t) for t in third.tasks] == digests


def test_a_single_task_name_as_tasks_is_refused_not_read_as_its_letters(bench):
    for call in (lambda: bench.evaluate(bench.pretrained_state(), "val", tasks="colours"),
                 lambda: bench.experts(tasks="colours"), lambda: bench.multitask(tasks="colours")):
        with pytest.raises(ValueError, match=r"tasks='colours' is not valid; give a list of task names, e.g. \['colours'\]"):
            call()


def test_the_encoder_pretrains_on_its_fixed_threads_whoever_calls_and_another_count_is_another_key(bench, monkeypatch):
    """A pretrained encoder's bits depend on the thread count (reductions split differently), and the shipped one
    was made on two: pretraining runs on ``pretrain_threads`` (two) from a caller on one thread, gives the caller's
    count back, and a benchmark that pretrains on another count caches its encoder under another key."""
    import mergelab.benchmarks.tiny.benchmark as tiny

    seen = []
    real = tiny.pretrain_factors
    monkeypatch.setattr(tiny, "pretrain_factors",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.pretrained_state()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [bench.pretrain_threads] == [tiny.SHIPPED_PRETRAIN_THREADS] == [2]
    assert bench._pretrained_artifact.meta()["environment"]["threads"] == 2

    class OneThread(TinyBenchmark):
        pretrain_threads = 1

    one = OneThread(bench.config, device="cpu", progress=False)
    assert one.encoder_key != bench.encoder_key
