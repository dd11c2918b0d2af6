"""requirements.lock records the environment the book was last built and tested with."""

from __future__ import annotations

import platform
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def read_lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    return pins


@pytest.mark.skipif(f"{platform.system()} {platform.machine()}" != "Linux x86_64",
                    reason="requirements.lock pins Linux x86_64 wheels; make env ignores it elsewhere")
def test_the_lock_pins_exactly_what_this_environment_runs():
    lock = runpy.run_path(str(ROOT / "scripts" / "lock.py"))
    installed = lock["closure"]()
    assert "torch" in installed and "pytest" in installed and "jupyterlab" in installed
    pins = read_lock()
    if lock["cpu_torch"]():  # README's CPU-only torch, kept by make env: the lock's GPU pins were not installed
        pins = {k: v for k, v in pins.items() if not lock["GPU_PINS"].match(k)}
        installed = {k: v for k, v in installed.items() if not lock["GPU_PINS"].match(k)}
    stale = {k: (v, installed.get(k)) for k, v in pins.items() if installed.get(k) != v}
    missing = sorted(set(installed) - set(pins))
    assert not stale and not missing, (
        f"requirements.lock is out of date (pinned vs installed: {stale}; not pinned: {missing}); run `make lock`")


def test_the_closure_walks_an_extra_asked_for_after_its_distribution_was_reached_without_it():
    """jsonschema is reached from nbformat plainly and from jupyter-events as jsonschema[format-nongpl]: the second
    path's extra requirements (rfc3987-syntax and its lark) belong in the lock too, whichever path comes first."""
    from types import SimpleNamespace

    requires = {"root": ["a", "b"], "a": ["c>=1"], "b": ["c[x]; python_version >= '3'"],
                "c": ["d; extra == 'x'", "e"], "d": [], "e": []}
    fake = SimpleNamespace(distribution=lambda name: SimpleNamespace(requires=requires[name]),
                           version=lambda name: "1.0", PackageNotFoundError=LookupError)
    lock = runpy.run_path(str(ROOT / "scripts" / "lock.py"))
    lock["closure"].__globals__["metadata"] = fake
    assert set(lock["closure"]("root", ())) == {"a", "b", "c", "d", "e"}
    requires["root"] = ["b", "a"]  # the other order of the two paths
    assert set(lock["closure"]("root", ())) == {"a", "b", "c", "d", "e"}


def test_make_env_keeps_a_cpu_only_torch_by_skipping_the_gpu_pins(tmp_path, monkeypatch):
    """README: install the CPU-only torch first and `make env` keeps it. The lock pins torch, torchvision, the
    CUDA libraries and Triton (about 4 GB); with a `+cpu` torch installed, `lock.py --for-env` leaves exactly those
    out, and with the regular torch it hands over the lock unchanged."""
    from importlib import metadata

    lock = runpy.run_path(str(ROOT / "scripts" / "lock.py"))
    text = (ROOT / "requirements.lock").read_text()
    kept = lock["without_gpu_pins"](text).splitlines()
    dropped = [line for line in text.splitlines() if line not in kept]
    names = {line.split("==")[0] for line in dropped}
    assert {"torch", "torchvision", "triton", "nvidia-cublas", "cuda-toolkit"} <= names
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in names)
    assert [line for line in kept if line.startswith("#")] == [line for line in text.splitlines() if line.startswith("#")]
    assert not any(line.split("==")[0].startswith(("nvidia", "cuda")) for line in kept if not line.startswith("#"))
    version = metadata.version
    for build, expected in (("2.14.1+cpu", "\n".join(kept) + "\n"), ("2.14.1", text)):
        main = runpy.run_path(str(ROOT / "scripts" / "lock.py"))
        monkeypatch.setattr(metadata, "version", lambda name, b=build: b if name == "torch" else version(name))
        assert main["main"](["--for-env", str(tmp_path / "env.lock")]) == 0
        assert (tmp_path / "env.lock").read_text() == expected, build
