"""Session 18 of the tiny-benchmark design (session 30 of the project): the tasks' pixel noise, the encoder unchanged.

The hard tasks' experts do not fit their training split (session 16: digits .80, counting .91), so their margins
end barely past the decision boundary and their own-task curves are straight. This fine-tunes the experts on the
8 tasks drawn with per-pixel Gaussian noise of SD NOISE (`data.noise`; the package's 0.08) from the package's
pretrained encoder (the shipped one, injected: the encoder's contrastive term reads the tasks' images, so it
would otherwise be pretrained again), then runs chapter 00's seed study (weight averaging, task arithmetic,
TSV-M, TSV-C; test split, coefficients on validation) and the own-task diagnostics at one thread.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session18_noise.py NOISE OUT.json [SEEDS, default 0]
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

from mergelab.analysis.diagnostics import gain_fraction, margin_linearity, own_task_curve  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

noise, out = float(sys.argv[1]), sys.argv[2]
seeds = [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
package = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                        head_shots=p["head_shots"]), device="cpu", progress=False)
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data={**p["data"], "noise": noise}, model=p["model"],
                                                      pretrain=p["pretrain"], head_shots=p["head_shots"]),
                      device="cpu", progress=False)
bench._pretrained = package.pretrained_state()  # the package's encoder, not one pretrained on the larger pool
pre = bench.pretrained_state()
start = time.perf_counter()
study = ch00.seed_study(bench, pre, TINY_RECIPE, seeds, merge_methods=("weight_averaging", "task_arithmetic"),
                        progress=False)
experts = bench.experts(replace(TINY_RECIPE, seed=seeds[0]))
tvs = task_vectors_from(pre, experts)
curve = own_task_curve(bench, pre, tvs)
margins = margin_linearity(bench, pre, tvs, curve=curve)
res = {"noise": noise, "seeds": seeds, "encoder_sha256": package.pretrained_sha256,
       "wall_s": round(time.perf_counter() - start, 1), "seed_study": study,
       "gain_at_0.3": {t: gain_fraction(c, 0.3) for t, c in curve.items()}, "margin_linearity": margins,
       "per_task_test": {m: study["per_seed"][str(seeds[0])][m]["per_task_accuracy"]
                         for m in ("zero_shot", "experts", "task_arithmetic")}}
summary = study["summary"]
short = {m: (round(summary[m]["absolute_accuracy"]["mean"], 3), round(summary[m]["normalized_accuracy"]["mean"], 3))
         for m in ("zero_shot", "experts", "weight_averaging", "task_arithmetic", "tsv_merge_validated", "tsv_compress")}
short["ta_coefficient"] = [study["per_seed"][str(s)]["task_arithmetic"]["coefficient"] for s in seeds]
short["gain_0.3_mean"] = round(float(np.nanmean(list(res["gain_at_0.3"].values()))), 3)
short["crossing_median"] = {t: round(r["crossing_median"], 2) for t, r in margins.items()}
res["short"] = short
print(json.dumps(short), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
