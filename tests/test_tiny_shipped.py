"""What ships with mergelab: the pretrained `tiny` encoder (and the `smoke` one beside it), chapter 00's default
runs with their heads, and chapter 06's default models trained from scratch. Each is its default configuration's,
intact, and taken instead of being made here only where its key matches."""

from __future__ import annotations

import pytest
import torch

from mergelab.benchmarks.tiny import ship
from mergelab.report.shipped_encoder import SHIPPED_PROFILES, default_benchmark, default_encoder_keys
from mergelab.cache import file_sha256
from mergelab.utils import load_safetensors


def test_the_shipped_encoders_are_the_default_configurations_and_intact():
    assert ship.shipped_keys() == default_encoder_keys(), (
        "the shipped encoders no longer match the default configurations of params/tiny and params/smoke (their data, "
        "model, pretraining or its code version changed): run `python -m mergelab.report.shipped_encoder --update` "
        "(pretrains the tiny one, about 4 minutes) and `... --update --profile smoke` (about 20 s), and commit "
        "src/mergelab/benchmarks/tiny/weights/")
    for profile in SHIPPED_PROFILES:
        bench = default_benchmark(profile=profile)
        shipped = ship.shipped_artifact(bench.encoder_key)
        meta = shipped.meta()
        assert file_sha256(shipped.path) == meta["sha256"]
        assert len(meta["loss"]) == bench.config.pretrain.num_steps and meta["environment"]["torch"]
        assert meta["environment"]["threads"] == bench.pretrain_threads  # made on the threads every caller pretrains on


@pytest.mark.parametrize("profile", SHIPPED_PROFILES)
def test_a_fresh_cache_takes_the_shipped_encoder_instead_of_pretraining(profile, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    bench = default_benchmark(profile=profile)
    state = bench.pretrained_state()
    shipped = ship.shipped_artifact(bench.encoder_key)
    reference = load_safetensors(str(shipped.path))
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    log = bench.pretraining_log()
    assert log["shipped"] is True and bench.pretrained_sha256 == shipped.meta()["sha256"]
    assert not (tmp_path / "tiny" / "pretext").exists() and not list(tmp_path.glob("tiny/pretext-*"))  # no pool made
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")  # asking to pretrain where the shipped copy is cached: told what to do
    with pytest.raises(ValueError, match=r"MERGELAB_PRETRAIN=1 .* shipped one.*clean-cache"):
        default_benchmark(profile=profile).pretrained_state()


def test_the_shipped_encoder_is_ignored_on_request_and_for_other_configurations(monkeypatch):
    key = default_benchmark().encoder_key
    assert ship.shipped_artifact(key) is not None
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")
    assert ship.shipped_artifact(key) is None
    monkeypatch.delenv(ship.ENV_PRETRAIN)
    assert ship.shipped_artifact("0" * 16) is None


# ---------------------------------------------------------------- the default experts, multi-task model and heads
@pytest.fixture
def shipped_env(module_data_dir, monkeypatch):
    """A data folder of this module's own (the user's may hold an encoder pretrained there) and neither
    MERGELAB_FINETUNE nor MERGELAB_PRETRAIN set, whatever the shell exported."""
    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.delenv(variable, raising=False)
    return module_data_dir


def test_the_shipped_runs_and_heads_are_the_default_configurations_and_intact(shipped_env):
    from mergelab.report.shipped_encoder import default_run_names, default_runs

    bench = default_benchmark()
    assert ship.shipped_runs() == default_run_names(bench), (
        "the shipped tiny experts no longer match chapter 00's default runs (the encoder, heads, recipe, seeds or "
        "fine-tuning code version changed): run `python -m mergelab.report.shipped_encoder --update-runs` in an "
        "empty MERGELAB_DATA_DIR (trains them, about 5 minutes) and commit src/mergelab/benchmarks/tiny/weights/")
    encoder_sha = ship.shipped_artifact(bench.encoder_key).meta()["sha256"]
    heads = ship.shipped_heads(bench.encoder_key, f"heads-canonical-threads{bench.train_threads}")
    assert file_sha256(heads.path) == heads.meta()["sha256"] and heads.meta()["pretrained_sha256"] == encoder_sha
    assert bench.heads["digits"].digest() and bench.pretraining_log()["shipped"] is True
    runs = default_runs()
    pretrained = load_safetensors(str(ship.shipped_artifact(bench.encoder_key).path))
    assert [k for k, _, _ in runs].count("multitask") == 1 and len(runs) == 1 + 3 * len(bench.tasks)
    for kind, tasks, cfg in runs:
        shipped = ship.shipped_run(kind, bench.run_key(kind, tasks, cfg))
        meta = shipped.meta()
        assert file_sha256(shipped.path) == meta["sha256"] and meta["pretrained_sha256"] == encoder_sha
        assert meta["kind"] == kind and meta["tasks"] == list(tasks) and meta["finetune"]["seed"] == cfg.seed
        assert len(meta["loss"]) == cfg.num_steps and not meta.get("shipped")
        assert cfg.frozen == ("conv1",) and meta["finetune"]["frozen"] == ["conv1"]  # the tiny recipe holds the stem
        state = load_safetensors(str(shipped.path))
        assert torch.equal(state["conv1.weight"], pretrained["conv1.weight"]), f"{kind} {tasks} moved the frozen stem"
        assert not torch.equal(state["transformer.resblocks.0.mlp.c_fc.weight"],
                               pretrained["transformer.resblocks.0.mlp.c_fc.weight"])


def test_a_fresh_cache_takes_the_shipped_heads_and_runs_instead_of_building_them(tmp_path, monkeypatch):
    from mergelab.experiments.ch00_benchmark import train_experts
    from mergelab.report.shipped_encoder import default_runs

    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    bench = default_benchmark()

    def never(*args, **kwargs):
        raise AssertionError("a shipped head or run was built here")

    monkeypatch.setattr(bench, "head_prototypes", never)
    monkeypatch.setattr(bench, "finetune_encoder", never)
    runs = default_runs()
    seeds = sorted({cfg.seed for _, _, cfg in runs[1:]})
    assert train_experts(bench, runs[1][2], seeds, workers=1, progress=False, multitask=runs[0][2]) == 0
    name = f"heads-canonical-threads{bench.train_threads}"
    heads = load_safetensors(str(ship.shipped_heads(bench.encoder_key, name).path))
    bench.heads  # noqa: B018 - the heads every run key holds
    cached = load_safetensors(str(bench.heads_path()))
    assert set(cached) == set(heads) and all(torch.equal(cached[t], heads[t]) for t in heads)
    for kind, tasks, cfg in (runs[0], runs[1], runs[-1]):
        state = bench.multitask(cfg, tasks) if kind == "multitask" else bench.expert(tasks[0], cfg)
        reference = load_safetensors(str(ship.shipped_run(kind, bench.run_key(kind, tasks, cfg)).path))
        assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
        assert bench.run_artifact(kind, tasks, cfg).meta()["shipped"] is True
    kind, tasks, cfg = runs[1]
    assert bench.expert_log(tasks[0], cfg)["shipped"] is True
    monkeypatch.setenv(ship.ENV_FINETUNE, "1")  # asking to fine-tune where the shipped copies are cached: told what to do
    with pytest.raises(ValueError, match=r"MERGELAB_FINETUNE=1 .* shipped expert .*clean-cache"):
        default_benchmark().expert(tasks[0], cfg)


def test_shipped_heads_and_runs_are_ignored_on_request_and_for_other_runs_or_encoders(shipped_env, monkeypatch):
    from dataclasses import replace

    from mergelab.report.shipped_encoder import default_runs

    bench = default_benchmark()
    kind, tasks, cfg = default_runs()[1]
    key, name = bench.run_key(kind, tasks, cfg), f"heads-canonical-threads{bench.train_threads}"
    assert ship.shipped_run(kind, key) is not None and bench.shipped_run(kind, tasks, cfg) is not None
    assert bench._made_from_this_encoder(ship.shipped_heads(bench.encoder_key, name)) is not None
    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.setenv(variable, "1")
        assert ship.shipped_run(kind, key) is None
        monkeypatch.delenv(variable)
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")
    assert ship.shipped_heads(bench.encoder_key, name) is None
    monkeypatch.delenv(ship.ENV_PRETRAIN)
    assert ship.shipped_heads("0" * 16, name) is None and ship.shipped_heads(bench.encoder_key, "heads-shots8-threads1") is None
    assert bench.shipped_run(kind, tasks, replace(cfg, seed=99)) is None  # another recipe: trained
    assert ship.shipped_run("multitask", key) is None  # the key of another kind
    with pytest.raises(ValueError, match=r"kind='probe' is not valid; use one of expert, multitask"):
        ship.shipped_run("probe", key)
    # a data folder whose encoder is not the one they were made from (MERGELAB_PRETRAIN=1 made it)
    monkeypatch.setattr(type(bench), "pretrained_sha256", property(lambda self: "0" * 64))
    assert bench.shipped_run(kind, tasks, cfg) is None and bench._made_from_this_encoder(ship.shipped_heads(bench.encoder_key, name)) is None


def test_shipping_replaces_an_artifact_atomically_and_removes_the_others_only_afterwards(tmp_path, monkeypatch):
    """An interrupted ship leaves the old weights whole and no log beside them (readers do not see a half-shipped
    artifact, and never a log that describes other weights); the old files of another name go only once the new
    ones are in place."""
    from mergelab import utils
    from mergelab.cache import Artifact
    from mergelab.report import shipped_encoder

    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(shipped_encoder, "WEIGHTS_DIR", weights)

    def cached(name: str, payload: bytes) -> Artifact:
        path = tmp_path / "cache" / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)
        utils.atomic_write_json(path.with_suffix(".json"), {"sha256": name})
        return Artifact(path)

    first = shipped_encoder._ship(cached("a", b"old weights"), weights / "heads-a.safetensors")
    assert first.read_bytes() == b"old weights" and Artifact(first).exists()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(shipped_encoder, "atomic_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shipped_encoder._ship(cached("b", b"new weights"), first)
    assert first.read_bytes() == b"old weights" and not Artifact(first).exists()
    monkeypatch.undo()
    monkeypatch.setattr(shipped_encoder, "WEIGHTS_DIR", weights)

    second = shipped_encoder._ship(cached("c", b"newer weights"), weights / "heads-c.safetensors")
    shipped_encoder._remove_others("heads-*", {second.stem})
    assert sorted(p.name for p in weights.iterdir()) == ["heads-c.json", "heads-c.safetensors"]
    assert Artifact(second).meta() == {"sha256": "c"}


def test_atomic_copy_leaves_the_target_whole_when_the_copy_fails(tmp_path):
    from mergelab.utils import atomic_copy

    target = tmp_path / "target.bin"
    target.write_bytes(b"before")
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.bin", target)
    assert target.read_bytes() == b"before" and [p.name for p in tmp_path.iterdir()] == ["target.bin"]
    (tmp_path / "source.bin").write_bytes(b"after")
    atomic_copy(tmp_path / "source.bin", target)
    assert target.read_bytes() == b"after"


def test_on_a_gpu_what_is_made_there_has_keys_of_its_own_and_the_shipped_bits_are_still_read(tmp_path, monkeypatch):
    """A data folder shared by a GPU machine and a CPU one: an encoder, heads, experts or trajectories made on the
    GPU have other last bits, so their keys name the device (the CPU's keys, and the shipped ones, stay as they
    were); the shipped encoder, heads and default runs are read on every device, as downloaded weights are. Only
    the keys are read here (the device is relabelled; nothing runs on it)."""
    from mergelab.report.shipped_encoder import default_runs
    from mergelab.training.trajectories import _trajectory_key

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.delenv(variable, raising=False)
    cpu, gpu = default_benchmark(), default_benchmark()
    gpu.device = torch.device("cuda")
    assert cpu.shipped_encoder_key == cpu.encoder_key == gpu.shipped_encoder_key != gpu.encoder_key
    assert gpu.cache_dir != cpu.cache_dir
    assert (cpu.heads_name(), gpu.heads_name(), gpu.heads_name(cpu=True)) == (
        "heads-canonical-threads1", "heads-canonical-threads1-cuda", "heads-canonical-threads1")
    # on the GPU the shipped encoder and heads are read (nothing is pretrained or built)
    state, reference = gpu.pretrained_state(), cpu.pretrained_state()
    assert gpu.pretraining_log()["shipped"] is True and gpu.pretrained_sha256 == cpu.pretrained_sha256
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert {t: gpu.head_digest(t) for t in gpu.tasks} == {t: cpu.head_digest(t) for t in cpu.tasks}
    kind, tasks, cfg = default_runs()[1]
    assert gpu.run_key(kind, tasks, cfg) != cpu.run_key(kind, tasks, cfg) == gpu.run_key(kind, tasks, cfg, parts={})
    assert gpu.shipped_run(kind, tasks, cfg) is not None  # trained on the CPU, shipped, read on the GPU too
    assert _trajectory_key(gpu, "epoch_trajectory", tasks, cfg, 2) != _trajectory_key(cpu, "epoch_trajectory", tasks,
                                                                                       cfg, 2)


def test_shipping_one_profiles_encoder_keeps_the_others_and_removes_stale_ones(tmp_path, monkeypatch):
    """`--update --profile smoke` ships the smoke encoder beside the tiny one, and removes an encoder that is no
    profile's default (what a change of the pretraining left behind)."""
    from mergelab.report import shipped_encoder

    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path / "data"))
    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.delenv(variable, raising=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    tiny_key, smoke_key = (default_benchmark(profile=p).encoder_key for p in ("tiny", "smoke"))
    for key in (tiny_key, "0" * 16):
        (weights / f"encoder-{key}.safetensors").write_bytes(b"weights")
        (weights / f"encoder-{key}.json").write_text("{}")
    monkeypatch.setattr(shipped_encoder, "WEIGHTS_DIR", weights)
    # the cache takes the package's shipped smoke encoder first, so `update` ships that copy: nothing pretrains here
    # (on an empty cache `update` pretrains, whose bits are the shipped ones only in the environment that made them)
    default_benchmark(profile="smoke").pretrained_state()
    target = shipped_encoder.update("smoke")
    assert target == weights / f"encoder-{smoke_key}.safetensors"
    assert sorted(p.name for p in weights.iterdir()) == sorted(
        f"encoder-{k}.{ext}" for k in (tiny_key, smoke_key) for ext in ("json", "safetensors"))
    assert file_sha256(target) == file_sha256(ship.shipped_artifact(smoke_key).path)


def test_a_profile_whose_encoder_does_not_ship_is_refused_by_name(capsys):
    from mergelab.report import shipped_encoder

    with pytest.raises(ValueError, match=r"profile='clip' is not valid; use one of tiny, smoke"):
        default_benchmark(profile="clip")
    with pytest.raises(SystemExit):  # the runs that ship are tiny's: a profile there would be ignored
        shipped_encoder.main(["--check-runs", "--profile", "smoke"])
    assert "--profile smoke applies to --check and --update" in capsys.readouterr().err


# ---------------------------------------------------------------- chapter 06's models trained from scratch
def _chapter_06_defaults() -> dict:
    from mergelab.params import profile_params
    from mergelab.report.shipped_encoder import SCRATCH_CHAPTER

    return profile_params("tiny", SCRATCH_CHAPTER)


def test_chapter_06s_shipped_models_are_its_default_models_and_intact(shipped_env):
    from mergelab.report.shipped_encoder import default_scratch

    p = _chapter_06_defaults()
    defaults = default_scratch()
    assert ship.shipped_scratch_names() == sorted(a.path.stem for a in defaults), (
        "the shipped models of chapter 06 no longer match its tiny recipes (params/tiny/06_cycle_consistent_merging."
        "yaml, or the training code's version changed): run `python -m mergelab.report.shipped_encoder --update-runs` "
        "in an empty MERGELAB_DATA_DIR (chapter 06's models: about 3 minutes) and commit "
        "src/mergelab/benchmarks/tiny/weights/")
    assert len(defaults) == len(p["architectures"]) * p["num_models"]
    seeds = {}
    for artifact in defaults:
        shipped = ship.shipped_scratch(artifact.path.stem)
        meta = shipped.meta()
        assert file_sha256(shipped.path) == meta["sha256"] and not meta.get("shipped")  # trained, not a copy
        recipe = p["architectures"][meta["config"]["arch"]]
        assert {k: meta["config"][k] for k in recipe} == {k: list(v) if isinstance(v, list) else v
                                                          for k, v in recipe.items()}
        assert meta["steps"] > 0 and meta["final_batch_loss"] < 0.5  # trained to fit its split
        seeds.setdefault(meta["config"]["arch"], []).append(meta["config"]["seed"])
    assert {a: sorted(s) for a, s in seeds.items()} == {a: list(range(p["seed"], p["seed"] + p["num_models"]))
                                                         for a in p["architectures"]}


def test_a_fresh_cache_takes_chapter_06s_shipped_models_instead_of_training_them(tmp_path, monkeypatch):
    from mergelab.experiments import ch06_models as ch
    from mergelab.executors import LocalExecutor
    from mergelab.training import scratch

    for variable in (ship.ENV_FINETUNE, ship.ENV_PRETRAIN):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))

    def never(*args, **kwargs):
        raise AssertionError("a shipped model was trained here")

    monkeypatch.setattr(scratch, "_train_from_scratch", never)
    p = _chapter_06_defaults()
    trained = ch.train_all(p["architectures"], p["num_models"], p["seed"], p["digits"], LocalExecutor(2))
    _, data_key = ch.digits_data(p["digits"])
    for arch, recipe in p["architectures"].items():
        for i, state in enumerate(trained[arch].states):
            cached = scratch.scratch_artifact(scratch.ScratchConfig(arch=arch, **recipe, seed=p["seed"] + i), data_key)
            reference = load_safetensors(str(ship.shipped_scratch(cached.path.stem).path))
            assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
            assert cached.meta()["shipped"] is True
    # another recipe, or a request to train, finds nothing shipped; asked where the copies are cached: told what to do
    other = scratch.scratch_artifact(scratch.ScratchConfig(arch="mlp", **{**p["architectures"]["mlp"], "epochs": 1}),
                                     data_key)
    assert ship.shipped_scratch(other.path.stem) is None
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")  # the encoder pretrained here changes nothing of these models
    assert ship.shipped_scratch(cached.path.stem) is not None
    monkeypatch.delenv(ship.ENV_PRETRAIN)
    monkeypatch.setenv(ship.ENV_FINETUNE, "1")
    assert ship.shipped_scratch(cached.path.stem) is None and ch.shipped_model(cached.path.stem) is None
    with pytest.raises(ValueError, match=r"MERGELAB_FINETUNE=1 asks to train chapter 06's models here.*clean-cache"):
        ch.train_all(p["architectures"], p["num_models"], p["seed"], p["digits"], LocalExecutor(2))
