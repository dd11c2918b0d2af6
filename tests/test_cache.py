"""The one cache pattern (mergelab.cache.Artifact): atomic, complete only with its sidecar, checked on load."""

from __future__ import annotations

import pytest
import torch

from mergelab.cache import Artifact, CorruptArtifactError


def _build(calls):
    def build():
        calls.append(1)
        return {"w": torch.arange(6.0).reshape(2, 3)}, {"note": "made"}
    return build


def test_an_artifact_is_built_once_then_loaded(tmp_path):
    calls = []
    art = Artifact.at(tmp_path, "expert", "abc")
    first = art.get_or_build(_build(calls))
    again = art.get_or_build(_build(calls))
    assert calls == [1] and torch.equal(first["w"], again["w"])
    assert art.path.name == "expert-abc.safetensors" and art.meta()["note"] == "made" and "sha256" in art.meta()


def test_weights_without_a_sidecar_are_not_a_cached_artifact(tmp_path):
    calls = []
    art = Artifact.at(tmp_path, "expert", "abc")
    art.get_or_build(_build(calls))
    art.sidecar.unlink()  # as if interrupted between the two writes
    art.get_or_build(_build(calls))
    assert calls == [1, 1]


def test_a_flipped_byte_or_a_truncated_file_is_reported_with_its_path_and_rebuilt(tmp_path, capsys):
    calls = []
    art = Artifact.at(tmp_path, "expert", "abc")
    good = {k: v.clone() for k, v in art.get_or_build(_build(calls)).items()}
    data = bytearray(art.path.read_bytes())
    data[-3] ^= 0xFF  # a byte of the tensor data
    art.path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=rf"{art.path.name} is corrupt.*SHA-256.*make clean-cache"):
        art.load()
    rebuilt = art.get_or_build(_build(calls))
    assert calls == [1, 1] and torch.equal(rebuilt["w"], good["w"])
    assert "is corrupt" in capsys.readouterr().out
    art.path.write_bytes(art.path.read_bytes()[:20])
    with pytest.raises(CorruptArtifactError, match="corrupt"):
        art.load()
