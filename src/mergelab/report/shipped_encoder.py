"""Developer tool for the pretrained `tiny` encoder shipped with mergelab (:mod:`mergelab.benchmarks.tiny.ship`).

``python -m mergelab.report.shipped_encoder --check`` pretrains the default encoder (``params/tiny``) in a
temporary cache and compares it with the shipped one; ``--update`` ships the default encoder of this
checkout's cache (pretraining it if needed), after a change to the pretraining code, data or configuration.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..benchmarks.tiny.ship import ENV_PRETRAIN, WEIGHTS_DIR, shipped_artifact, shipped_keys
from ..benchmarks.tiny.ship import environment as torch_environment
from ..cache import Artifact, file_sha256
from ..utils import environment


def default_benchmark(progress: bool = False) -> Any:
    """The `tiny` benchmark of ``params/tiny/_benchmark.yaml`` (what `make report` runs), on the CPU."""
    from .. import load_benchmark
    from ..params import profile_params

    p = profile_params("tiny", "00_benchmark_and_baselines")
    return load_benchmark("tiny", device="cpu", progress=progress,
                          **{k: p[k] for k in ("tasks", "data", "model", "pretrain", "head_shots")})


def update() -> Path:
    """Ship the default encoder of this checkout's cache (pretrained here if missing); remove others."""
    bench = default_benchmark(progress=True)
    cached = Artifact(bench.cache_dir / "pretrained.safetensors")
    if not cached.exists():
        with environment({ENV_PRETRAIN: "1"}):
            bench.pretrained_state()
    if "environment" not in cached.meta():
        raise SystemExit(f"the cached encoder {cached.path} does not record the torch build and threads that made it "
                         f"(it predates that record): pretrain it again with {ENV_PRETRAIN}=1 and an empty "
                         "MERGELAB_DATA_DIR, then run --update there.")
    WEIGHTS_DIR.mkdir(exist_ok=True)
    for old in WEIGHTS_DIR.glob("encoder-*"):
        old.unlink()
    target = WEIGHTS_DIR / f"encoder-{bench.encoder_key}.safetensors"
    shutil.copyfile(cached.path, target)
    shutil.copyfile(cached.sidecar, target.with_suffix(".json"))
    return target


def check() -> bool:
    """Pretrain the default encoder in a temporary cache, at the thread count the shipped one records, and
    say whether it equals the shipped one."""
    from ..utils import load_safetensors, torch_threads

    key = default_benchmark().encoder_key
    shipped = shipped_artifact(key)
    if shipped is None:
        print(f"no shipped encoder has this configuration's key {key} (shipped: {shipped_keys()}); run --update")
        return False
    theirs = shipped.meta().get("environment", {})
    with tempfile.TemporaryDirectory() as tmp, environment({"MERGELAB_DATA_DIR": tmp, ENV_PRETRAIN: "1"}), \
            torch_threads(theirs.get("threads")):
        bench = default_benchmark(progress=True)
        made = bench.pretrained_state()
        here = torch_environment()
        same = file_sha256(Path(tmp) / "tiny" / f"encoder-{key}" / "pretrained.safetensors") == file_sha256(shipped.path)
    ref = load_safetensors(str(shipped.path))
    diff = max(float((made[k].float() - ref[k].float()).abs().max()) for k in ref)
    verdict = "bit-identical" if same else f"differ, largest weight difference {diff:.3g}"
    print(f"pretrained here ({here}) vs shipped ({theirs or 'environment not recorded'}): {verdict}")
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergelab.report.shipped_encoder", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="pretrain here and compare with the shipped encoder")
    group.add_argument("--update", action="store_true", help="ship this checkout's default encoder")
    args = parser.parse_args(argv)
    if args.update:
        print(f"shipped {update()}")
        return 0
    return 0 if check() else 1


if __name__ == "__main__":
    raise SystemExit(main())
