"""The pretrained `tiny` encoder shipped with mergelab: it is the default configuration's, intact, and
taken instead of pretraining only where its key matches."""

from __future__ import annotations

import pytest
import torch

from mergelab.benchmarks.tiny import ship
from mergelab.report.shipped_encoder import default_benchmark
from mergelab.cache import file_sha256
from mergelab.utils import load_safetensors


def test_the_shipped_encoder_is_the_default_configurations_and_intact():
    bench = default_benchmark()
    assert ship.shipped_keys() == [bench.encoder_key], (
        "the shipped tiny encoder no longer matches the default configuration (its data, model, pretraining or "
        "their code version changed): run `python -m mergelab.report.shipped_encoder --update` (pretrains it, "
        "about 4 minutes) and commit src/mergelab/benchmarks/tiny/weights/")
    shipped = ship.shipped_artifact(bench.encoder_key)
    meta = shipped.meta()
    assert file_sha256(shipped.path) == meta["sha256"]
    assert len(meta["loss"]) == bench.config.pretrain.num_steps and meta["environment"]["torch"]


def test_a_fresh_cache_takes_the_shipped_encoder_instead_of_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_DATA_DIR", str(tmp_path))
    bench = default_benchmark()
    state = bench.pretrained_state()
    shipped = ship.shipped_artifact(bench.encoder_key)
    reference = load_safetensors(str(shipped.path))
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    log = bench.pretraining_log()
    assert log["shipped"] is True and bench.pretrained_sha256 == shipped.meta()["sha256"]
    assert not (tmp_path / "tiny" / "pretext").exists() and not list(tmp_path.glob("tiny/pretext-*"))  # no pool made
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")  # asking to pretrain where the shipped copy is cached: told what to do
    with pytest.raises(ValueError, match=r"MERGELAB_PRETRAIN=1 .* shipped one.*clean-cache"):
        default_benchmark().pretrained_state()


def test_the_shipped_encoder_is_ignored_on_request_and_for_other_configurations(monkeypatch):
    key = default_benchmark().encoder_key
    assert ship.shipped_artifact(key) is not None
    monkeypatch.setenv(ship.ENV_PRETRAIN, "1")
    assert ship.shipped_artifact(key) is None
    monkeypatch.delenv(ship.ENV_PRETRAIN)
    assert ship.shipped_artifact("0" * 16) is None
