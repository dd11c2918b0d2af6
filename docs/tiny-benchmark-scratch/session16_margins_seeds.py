"""Session 16 of the tiny-benchmark design (session 26 of the project): chapter 00's margin table
(`analysis.diagnostics.margin_linearity`, validation) for each fine-tuning seed of its seed study, so that the
crossings read from seed 0 in the chapter can be compared with seeds 1 and 2 (experts cached by chapter 00).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_margins_seeds.py OUT.json [SEEDS, default 0,1,2]
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

torch.set_num_threads(1)

from mergelab.analysis.diagnostics import gain_fraction, margin_linearity, own_task_curve  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

out = sys.argv[1]
seeds = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 1, 2]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                      head_shots=p["head_shots"]), device="cpu", progress=False)
pre = bench.pretrained_state()
res = {}
for seed in seeds:
    tvs = task_vectors_from(pre, bench.experts(replace(TINY_RECIPE, seed=seed)))
    curve = own_task_curve(bench, pre, tvs)
    lin = margin_linearity(bench, pre, tvs, curve=curve)
    res[seed] = {t: {"crossing_median": r["crossing_median"], "largest_gap": r["largest_gap"], "gained": r["gained"],
                     "gain_at_0.3": gain_fraction(curve[t], 0.3)} for t, r in lin.items()}
    print(seed, json.dumps({t: [round(v["crossing_median"], 2), round(v["largest_gap"], 2), round(v["gain_at_0.3"], 2)]
                            for t, v in res[seed].items()}), flush=True)
Path(out).write_text(json.dumps(res, indent=1))
