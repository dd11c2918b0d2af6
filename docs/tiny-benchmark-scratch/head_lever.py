"""Session 6 of the tiny-benchmark design (issue 16): levers after pretraining (heads, fine-tuning), on two pretraining draws.

The heads' logit scale (30 in the package) does not change zero-shot accuracy, only the heads'
calibration and so what fine-tuning's cross-entropy pushes on: at 30 the canonical heads are
over-confident (confidence .56 at accuracy .32; the shapes head puts 99.9 % of images in one class).
This runs chapter 00's seed study (`experiments.ch00_benchmark.seed_study`: experts, zero-shot, weight
averaging, task arithmetic, TSV-M, TSV-C; test split, coefficients on validation) at one pretraining
seed, with the package's tiny parameters and TINY_RECIPE except for the overrides given: HEADS a JSON
object of `TinyBenchmarkConfig` fields after pretraining (`logit_scale`, `heads`, `head_shots`), RECIPE
a JSON object of `FinetuneConfig` fields. A `model` key in HEADS (a JSON object of `TinyViTConfig`
fields) changes the encoder itself, so that run pretrains its own encoder; a `pretrain` key (a JSON object of
`PretrainConfig` fields, e.g. `{"pretrain": {"unlabelled_weight": 0.25}}`) changes its pretraining, and a `data`
key (`TinyDataConfig` fields, e.g. `{"data": {"n_pretext": 60000}}`) its data.

The encoder does not depend on the heads, so it is pretrained once per pretraining seed and shared by
every heads' setting (`TinyBenchmark.encoder_key`; session 6 ran before that key existed and copied the
weights between caches, unchanged: same sha256).

usage: python docs/tiny-benchmark-scratch/head_lever.py PRETRAIN_SEED HEADS RECIPE OUT.json [SEEDS, default 0,1,2]
e.g.   python docs/tiny-benchmark-scratch/head_lever.py 0 '{"logit_scale": 10}' '{}' out.json
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

torch.set_num_threads(1)

from mergelab.analysis.diagnostics import linear_probe, zero_shot_calibration  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402

pre_seed, heads, recipe, out = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
seeds = [int(s) for s in sys.argv[5].split(",")] if len(sys.argv) > 5 else [0, 1, 2]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
model = {**p["model"], **heads.pop("model", {})}
data = {**p["data"], **heads.pop("data", {})}  # a `data` key (TinyDataConfig fields, e.g. n_pretext) changes the data
pretrain = {**p["pretrain"], **heads.pop("pretrain", {}), "seed": pre_seed}
cfg = TinyBenchmarkConfig.from_params(data=data, model=model, pretrain=pretrain,
                                      **{"head_shots": p["head_shots"], **heads})
bench = TinyBenchmark(cfg, device="cpu", progress=False)  # the encoder is cached apart from the heads (encoder_key)
start = time.perf_counter()
pre = bench.pretrained_state()
pretrain_s = time.perf_counter() - start
res = {"pretrain_seed": pre_seed, "pretrain": pretrain, "model": model, "heads": heads, "recipe": recipe, "seeds": seeds, "pretrained_sha256": bench.pretrained_sha256,
       "pretrain_wall_s": round(pretrain_s, 1)}
probe = linear_probe(bench, pre)
res["linear_probe"] = probe
res["linear_probe_mean"] = float(np.mean(list(probe.values())))
calib = zero_shot_calibration(bench, pre, "val")
res["zero_shot_calibration_val"] = calib
res["zero_shot_ce_mean"] = float(np.mean([c["cross_entropy"] for c in calib.values()]))
res["zero_shot_confidence_mean"] = float(np.mean([c["confidence"] for c in calib.values()]))
print(json.dumps({k: res[k] for k in ("pretrain_seed", "model", "heads", "recipe", "pretrain_wall_s", "linear_probe_mean", "zero_shot_ce_mean", "zero_shot_confidence_mean")}), flush=True)
start = time.perf_counter()
study = ch00.seed_study(bench, pre, replace(TINY_RECIPE, **recipe), seeds, progress=False)
res["study_wall_s"] = round(time.perf_counter() - start, 1)
res["seeds_study"] = study
summary = {m: {k: (round(v["mean"], 4), round(v["sd"], 4)) for k, v in s.items()} for m, s in study["summary"].items()}
res["summary_short"] = summary
print(json.dumps(summary), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
