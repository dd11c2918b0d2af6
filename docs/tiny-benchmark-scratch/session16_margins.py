"""Session 16 of the tiny-benchmark design (session 26 of the project), a diagnostic now in the package as
mergelab.analysis.diagnostics.margin_linearity: is the own-task curve linear because the network is (margins linear in alpha),
or because of the margin distribution? Per task, val split: margin m(alpha) = logit_true - max_other along
theta_0 + alpha tau_t; accuracy actual vs linearized (m(0) + alpha (m(1) - m(0)) > 0).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_margins.py RECIPE OUT.json  (RECIPE: FinetuneConfig fields over TINY_RECIPE, e.g. '{}')
"""
import json, sys
import numpy as np, torch, yaml
torch.set_num_threads(2)
from dataclasses import replace
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig
from mergelab.task_vectors import task_vectors_from
from mergelab.analysis.diagnostics import example_margins
recipe = replace(TINY_RECIPE, **json.loads(sys.argv[1]))
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
experts = bench.experts(replace(recipe, seed=0))
tvs = task_vectors_from(pre, experts)
alphas = [0, .1, .2, .3, .5, .7, 1.0]
out = {}
for t, tv in tvs.items():
    M = np.array([example_margins(bench, tv.apply_to(pre, a), t, "val").numpy() for a in alphas])
    acc = (M > 0).mean(1)
    lin = np.array([((M[0] + a * (M[-1] - M[0])) > 0).mean() for a in alphas])
    midlin = M[0] + 0.3 * (M[-1] - M[0])
    out[t] = {"acc": acc.round(3).tolist(), "lin_acc": lin.round(3).tolist(),
              "mean_margin": M.mean(1).round(2).tolist(),
              "corr_m03_vs_linear": float(np.corrcoef(M[3], midlin)[0, 1])}
    print(t, json.dumps(out[t]), flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
