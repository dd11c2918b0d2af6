"""Cached artifacts cannot outlive the code that made them (mergelab.codeversion)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mergelab
from mergelab import codeversion
from mergelab.benchmarks.clip.config import synthetic_root
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark
from mergelab.analysis.diagnostics import probe_path
from mergelab.benchmarks.tiny.data import TinyDataConfig, _cache_path
from mergelab.experiments.ch04_mass import result_path
from mergelab.experiments.ch05_merge3 import search_key
from mergelab.experiments.ch06_store import merge_artifact
from mergelab.training.scratch import ScratchConfig, scratch_artifact
from mergelab.training.trajectories import _trajectory_key as trajectory_key
from mergelab.utils import config_hash


def test_the_code_behind_each_cached_artifact_is_as_recorded():
    stale = codeversion.stale_kinds()
    assert not stale, (
        f"the code that makes the cached {', '.join(stale)} artifacts changed since it was recorded. If the change "
        "can change what is trained, bump its entry in mergelab.codeversion.CODE_VERSIONS (caches are rebuilt); "
        "then record the fingerprints: python -m mergelab.codeversion --update")


def test_fingerprints_ignore_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    return x + 1  # one\n')
    monkeypatch.setattr(codeversion, "PACKAGE", tmp_path)
    monkeypatch.setitem(codeversion.SOURCES, "finetune", ("m.py",))
    before = codeversion.source_fingerprint("finetune")
    (tmp_path / "m.py").write_text('"""Other doc."""\n\ndef f(x):\n    return x + 1\n')
    assert codeversion.source_fingerprint("finetune") == before
    (tmp_path / "m.py").write_text('def f(x):\n    return x + 2\n')
    assert codeversion.source_fingerprint("finetune") != before


def test_the_package_fingerprint_follows_code_and_shipped_data_not_docstrings_or_other_files(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text('"""Doc."""\n\ndef f(x):\n    return x + 1  # one\n')
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.safetensors").write_bytes(b"\x00\x01")
    monkeypatch.setattr(codeversion, "PACKAGE", tmp_path)
    before = codeversion.package_fingerprint()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.cpython.pyc").write_bytes(b"compiled")
    (tmp_path / "m.py").write_text('"""Other doc."""\n\ndef f(x):\n    return x + 1\n')
    (tmp_path / ".m.py.swp").write_bytes(b"an editor's swap file")
    assert codeversion.package_fingerprint() == before
    (tmp_path / "weights" / "w.safetensors").write_bytes(b"\x00\x02")
    shipped = codeversion.package_fingerprint()
    assert shipped != before
    (tmp_path / "n.py").write_text("X = 1\n")  # a new module anywhere counts
    assert codeversion.package_fingerprint() != shipped


@pytest.mark.parametrize("kind", list(codeversion.CODE_VERSIONS))
def test_a_version_bump_changes_the_cache_keys_of_its_kind(kind, monkeypatch):
    bench = TinyBenchmark.__new__(TinyBenchmark)  # keys only: nothing is built
    from mergelab.benchmarks.tiny.benchmark import TinyBenchmarkConfig

    bench.config = TinyBenchmarkConfig.from_params(tasks=["colours"])
    bench.device = torch.device("cpu")
    monkeypatch.setattr(bench, "head_digest", lambda task: "h", raising=False)
    cfg = mergelab.FinetuneConfig()

    # chapter 00's probes and chapter 04's MASS results, on a benchmark whose data keys stay fixed
    stub = SimpleNamespace(cache_dir="cache", evaluation_key=lambda task, split: f"{task}/{split}")
    router = SimpleNamespace(tasks=("colours",), fingerprint=lambda: {"router": 1}, cache_size=16)

    def keys() -> tuple[str, ...]:
        return (str(_cache_path("colours-train", TinyDataConfig())), bench.encoder_key,
                bench.key, bench.run_key("expert", ["colours"], cfg),
                trajectory_key(bench, "epoch_trajectory", ["colours"], cfg, 2),
                str(scratch_artifact(ScratchConfig(), {"dataset": "sklearn-digits"}).path),
                bench._eval_key("colours", "val"),
                str(merge_artifact(ScratchConfig(), (0, 1), {"max_iter": 3}, True, {"dataset": "sklearn-digits"}).path),
                str(probe_path(stub, {"w": torch.zeros(2)}, "colours", ("train", "val", "test"), (1.0,))),
                str(result_path(router, stub, "val", 8, 0, None, 0)),
                config_hash(search_key(SimpleNamespace(key="fitness"), {"w": torch.zeros(2)}, {"colours": {"w": torch.ones(2)}},
                                       8, 1.0)),
                str(synthetic_root()))

    before = keys()
    monkeypatch.setitem(codeversion.CODE_VERSIONS, kind, codeversion.CODE_VERSIONS[kind] + 1)
    after = keys()
    names = ("data", "encoder", "pretrain", "finetune", "trajectory", "scratch", "evaluation", "merge", "probe", "mass",
             "ga", "synthetic")
    changed = {name for name, a, b in zip(names, before, after) if a != b}
    # the benchmark key is in the experts', the trajectories' and the evaluations' keys, the images' version in
    # the encoder's and the benchmark's, and the models' code in the merges' keys
    downstream = {"pretrain", "finetune", "trajectory", "evaluation"}
    expected = {"data": {"data", "encoder", *downstream}, "pretrain": {"encoder", *downstream},
                "scratch": {kind, "merge"}, "evaluation": {kind, "probe"}}.get(kind, {kind})
    assert changed == expected
    with pytest.raises(ValueError, match="kind='weights'"):
        codeversion.key_part("weights")
