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


BUILD_IN_A_PROCESS = """
import sys, time
import torch
from mergelab.cache import Artifact
path, log = sys.argv[1], sys.argv[2]
def build():
    with open(log, "a") as f:
        f.write("built\\n")
    time.sleep(1.0)  # long enough for the other process to find the artifact missing and wait
    return {"w": torch.arange(4.0)}, {"by": "first"}
from pathlib import Path
print(Artifact(Path(path)).get_or_build(build)["w"].tolist())
"""


def test_two_processes_sharing_a_folder_build_an_artifact_once(tmp_path):
    import subprocess
    import sys

    path, log = tmp_path / "a.safetensors", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_A_PROCESS, str(path), str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["[0.0, 1.0, 2.0, 3.0]"] * 2
    assert log.read_text() == "built\n"  # the second process waited for the first and loaded its file


def test_a_result_path_names_its_key_and_needs_a_cache_folder_and_data_keys(tmp_path):
    """Results that are numbers (probes, curvature points, MASS) live under the benchmark's cache folder, named by
    the hash of their key; without a folder or data keys nothing is cached and the key (digests of weights, which
    cost time) is never computed. A file without the keys a result needs, or a damaged one, reads as missing."""
    from types import SimpleNamespace

    from mergelab.cache import read_result, result_path
    from mergelab.utils import atomic_write_json, config_hash

    bench = SimpleNamespace(cache_dir=tmp_path, evaluation_key=lambda task, split: f"{task}/{split}")
    path = result_path(bench, "probe", lambda: {"a": 1})
    assert path == tmp_path / "probe" / f"{config_hash({'a': 1})}.json"
    assert result_path(bench, "probe", lambda: {"a": 2}) != path

    def never() -> dict:
        raise AssertionError("the key of a result that is not cached must not be computed")

    assert result_path(SimpleNamespace(cache_dir=None, evaluation_key=bench.evaluation_key), "probe", never) is None
    assert result_path(SimpleNamespace(cache_dir=tmp_path), "probe", never) is None
    assert read_result(None, ("x",)) is None and read_result(path, ("x",)) is None
    atomic_write_json(path, {"x": 1, "y": 2})
    assert read_result(path, ("x", "y")) == {"x": 1, "y": 2} and read_result(path, ("x", "z")) is None
    path.write_text('{"x": 1')
    assert read_result(path, ("x",)) is None
