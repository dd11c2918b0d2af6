"""Session 8 of the tiny-benchmark design (issue 16): does the fine-tuning recipe make the own-task curve concave?

Task arithmetic at coefficient lambda keeps of each task roughly what theta_0 + lambda tau_t keeps (the
cross-task interference is small on this benchmark: mean -.008 at 0.3). On `tiny` the own-task curves
are near-linear in alpha (at alpha .3 the weak tasks reach a third of their expert's gain), on
ViT-B-32 they saturate early. This runs chapter 00's seed study at one fine-tuning seed with a recipe
(a JSON object of `FinetuneConfig` fields over TINY_RECIPE) on the package's tiny encoder and adds the
own-task curves on validation with each task's gain fraction at alpha .2 and .3.

usage: python docs/tiny-benchmark-scratch/concavity.py RECIPE OUT.json [SEED, default 0] [THREADS, default 2]
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)

from mergelab.analysis.diagnostics import gain_fraction, own_task_curve  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

recipe_over, out = json.loads(sys.argv[1]), sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
recipe = replace(TINY_RECIPE, **recipe_over)
start = time.perf_counter()
study = ch00.seed_study(bench, pre, recipe, [seed], progress=False)
experts = bench.experts(replace(recipe, seed=seed))
curves = own_task_curve(bench, pre, task_vectors_from(pre, experts))
res = {"recipe": recipe_over, "seed": seed, "pretrained_sha256": bench.pretrained_sha256,
       "wall_s": round(time.perf_counter() - start, 1), "own_task_curve_val": curves,
       "gain_fraction_0.2": {t: gain_fraction(c, 0.2) for t, c in curves.items()},
       "gain_fraction_0.3": {t: gain_fraction(c, 0.3) for t, c in curves.items()},
       "train_loss_end": {t: float(np.mean(bench.expert_log(t, replace(recipe, seed=seed))["loss"][-20:])) for t in experts},
       "seed_study": study}
rows = study["per_seed"][str(seed)]
short = {m: (round(r["absolute_accuracy"], 3), round(r["normalized_accuracy"], 3), r.get("coefficient")) for m, r in rows.items()}
short["gain_0.3_mean"] = round(float(np.nanmean(list(res["gain_fraction_0.3"].values()))), 3)
short["train_loss_end_mean"] = round(float(np.mean(list(res["train_loss_end"].values()))), 3)
res["short"] = short
print(json.dumps(short), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
