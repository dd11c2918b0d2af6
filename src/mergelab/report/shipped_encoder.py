"""Developer tool for the pretrained `tiny` encoder shipped with mergelab (:mod:`mergelab.benchmarks.tiny.ship`).

``python -m mergelab.report.shipped_encoder --check`` pretrains the default encoder (``params/tiny``) in a
temporary cache and compares it with the shipped one; ``--update`` ships the default encoder of this
checkout's cache (pretraining it if needed), after a change to the pretraining code, data or configuration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..benchmarks.tiny.ship import ENV_PRETRAIN, WEIGHTS_DIR, environment, shipped_artifact, shipped_keys
from ..cache import Artifact, file_sha256


def default_benchmark(progress: bool = False) -> Any:
    """The `tiny` benchmark of ``params/tiny/_benchmark.yaml`` (what `make report` runs), on the CPU."""
    from ..benchmarks.tiny import TinyBenchmark, TinyBenchmarkConfig
    from ..params import profile_params

    p = profile_params("tiny", "00_benchmark_and_baselines")
    cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                          head_shots=p["head_shots"])
    return TinyBenchmark(cfg, device="cpu", progress=progress)


def update() -> Path:
    """Ship the default encoder of this checkout's cache (pretrained here if missing); remove others."""
    bench = default_benchmark(progress=True)
    os.environ.pop(ENV_PRETRAIN, None)
    cached = Artifact(bench.cache_dir / "pretrained.safetensors")
    if not cached.exists():
        os.environ[ENV_PRETRAIN] = "1"
        try:
            bench.pretrained_state()
        finally:
            os.environ.pop(ENV_PRETRAIN)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    for old in WEIGHTS_DIR.glob("encoder-*"):
        old.unlink()
    target = WEIGHTS_DIR / f"encoder-{bench.encoder_key}.safetensors"
    shutil.copyfile(cached.path, target)
    shutil.copyfile(cached.sidecar, target.with_suffix(".json"))
    return target


def check() -> bool:
    """Pretrain the default encoder in a temporary cache and say whether it equals the shipped one."""
    from ..utils import load_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MERGELAB_DATA_DIR"], os.environ[ENV_PRETRAIN] = tmp, "1"
        bench = default_benchmark(progress=True)
        made = bench.pretrained_state()
        os.environ.pop(ENV_PRETRAIN)
        shipped = shipped_artifact(bench.encoder_key)
        if shipped is None:
            print(f"no shipped encoder has this configuration's key {bench.encoder_key} "
                  f"(shipped: {shipped_keys()}); run --update")
            return False
        ref = load_safetensors(str(shipped.path))
        diff = max(float((made[k].float() - ref[k].float()).abs().max()) for k in ref)
        same = file_sha256(Path(tmp) / "tiny" / f"encoder-{bench.encoder_key}" / "pretrained.safetensors") \
            == file_sha256(shipped.path)
        theirs = shipped.meta().get("environment", "environment not recorded")
        verdict = "bit-identical" if same else f"differ, largest weight difference {diff:.3g}"
        print(f"pretrained here ({environment()}) vs shipped ({theirs}): {verdict}")
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
