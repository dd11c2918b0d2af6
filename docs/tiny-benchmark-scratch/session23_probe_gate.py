"""Session 23 gate (issue 16, ranked list item 2): the probe of a pretraining variant, before any expert trains.

Pretrains the tiny encoder with the package's tiny parameters and the PretrainConfig overrides given (pinned two
threads, as the package pretrains), then runs the validated linear probe (chapter 00's, `linear_probe_fits`) on the
new encoder and on the shipped one in the same process. The gate for a pretraining lever is the probe of digits,
shapes and position (docs/tiny-benchmark.md, "What to try next").

usage: MERGELAB_DATA_DIR=EMPTY_DIR python docs/tiny-benchmark-scratch/session23_probe_gate.py PRETRAIN_SEED '{"unlabelled_batch": 128}' OUT.json
"""
import json
import sys
import time

import numpy as np
import torch
import yaml

from mergelab.analysis.diagnostics import linear_probe_fits
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig

seed, overrides, out = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
res = {"pretrain_seed": seed, "overrides": overrides}
for name, extra in (("variant", overrides), ("package", {})):
    cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"],
                                          pretrain={**p["pretrain"], **extra, "seed": seed}, head_shots=p["head_shots"])
    bench = TinyBenchmark(cfg, device="cpu", progress=False)
    start = time.perf_counter()
    pre = bench.pretrained_state()
    wall = time.perf_counter() - start
    torch.set_num_threads(1)
    probe = {t: r["accuracy"] for t, r in linear_probe_fits(bench, pre, progress=False).items()}
    res[name] = {"sha256": bench.pretrained_sha256, "pretrain_wall_s": round(wall, 1), "probe": probe,
                 "probe_mean": float(np.mean(list(probe.values())))}
    print(name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res[name]["probe"].items()}),
          "mean %.3f" % res[name]["probe_mean"], "pretrain %.0f s" % wall, flush=True)
json.dump(res, open(out, "w"), indent=1)
