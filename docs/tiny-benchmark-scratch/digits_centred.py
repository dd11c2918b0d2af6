"""Session 3 (issue 16): is the digits task hard because of the glyph's random offset?

The tiny digits task places a 24x24 glyph (scikit-learn's 8x8 digit, upscaled 3x) at a random offset of
0-8 pixels in the 32x32 image, i.e. anywhere across a third of the patch grid; MNIST centres its
digits (by centre of mass) in a 28x28 frame. This script regenerates only the digits task with the glyph
centred up to +-`JITTER` pixels (the generator is otherwise the package's), then, on the package's own
cached pretrained encoder and frozen heads (copied into its data folder), measures the digits linear
probe, zero-shot and the expert (TINY_RECIPE, seed 0) for both placements.

usage: MERGELAB_DATA_DIR=/tmp/digits python docs/tiny-benchmark-scratch/digits_centred.py <package data dir> out.json
"""
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from mergelab import paths  # noqa: E402
from mergelab.analysis import diagnostics as D  # noqa: E402
from mergelab.benchmarks.tiny import data as td  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402

JITTER = 1
source, out = Path(sys.argv[1]), sys.argv[2]
results = {}
for placement in ("random offset 0-8 (package)", f"centred +-{JITTER}"):
    if placement.startswith("centred"):
        original = td._draw_digits

        def centred(rng, n, noise, split_index, _orig=original):
            real = rng.integers  # the package draws the offset with rng.integers(0, 9, size=2): centre it instead

            class Rng:
                def __getattr__(self, name):
                    return getattr(rng, name)

                def integers(self, low, high=None, size=None, **kw):
                    if size == 2 and low == 0 and high == td.IMAGE_SIZE - 24 + 1:
                        return 4 + real(-JITTER, JITTER + 1, size=2)
                    return real(low, high, size=size, **kw)

            return _orig(Rng(), n, noise, split_index)

        td._GENERATORS["digits"] = centred
        for f in (paths.data_dir() / "tiny").glob("digits-*.npz"):
            f.unlink()  # regenerate the digits task with the new placement (this folder only)
    bench = TinyBenchmark(TinyBenchmarkConfig(), device="cpu", progress=False)
    target = bench.cache_dir
    target.mkdir(parents=True, exist_ok=True)
    for name in ("pretrained.safetensors", "pretrained.json", "heads-canonical-threads1.safetensors", "heads-canonical-threads1.json"):
        if not (target / name).exists():
            shutil.copy(source / "tiny" / target.name / name, target / name)
    pre = bench.pretrained_state()
    probe = D.linear_probe(bench, pre, tasks=["digits"])["digits"]
    zero_shot = bench.evaluate(pre, "test", ["digits"])["digits"]
    expert = bench.expert("digits", replace(TINY_RECIPE, seed=0)) if placement.startswith("centred") else None
    expert_acc = bench.evaluate(expert, "test", ["digits"])["digits"] if expert is not None else None
    results[placement] = {"probe": round(float(probe), 3), "zero_shot": round(float(zero_shot), 3),
                          "expert": None if expert_acc is None else round(float(expert_acc), 3)}
    print(placement, results[placement], flush=True)
json.dump(results, open(out, "w"), indent=1)
