"""How the single-expert bound's Lipschitz constant depends on where it is probed (issue 17, K = 1; session 18).

Reads chapter 01's results (reports/results/01_stability_bound.json, run with the 4-seen-example probe, before e1496b3),
rebuilds each single expert of its `experts_by_lr` table from the cache, and measures per-example gradient norms on
N seen and N test examples; the bound with each estimator is eps_k * L (eps_k = bound / L of the table).
usage: python docs/ch01-scratch/lipschitz_probe.py N OUT.json   (session 18: N = 32, session18_lipschitz_probe.json)
"""
import json, sys
from dataclasses import replace
import numpy as np, torch, yaml
torch.set_num_threads(1)
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig
from mergelab.training import FinetuneConfig
from mergelab.training.sweep import checkpoint_state
from mergelab.training.finetune import training_indices
from mergelab.analysis.generalization import _encoder, head_example_indices
from mergelab.autodiff import per_example_gradient_norms

p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
c = yaml.safe_load(open("params/tiny/01_stability_bound.yaml"))
base = FinetuneConfig(**c["finetune"], **c["centre"], seed=c["seeds"][0])
r = json.load(open("reports/results/01_stability_bound.json"))
n = int(sys.argv[1]) if len(sys.argv) > 1 else 64
out = []
for row in r["experts_by_lr"]:
    task = row["task"]
    fc = replace(base, lr=row["level"], num_steps=row["step"])
    state = checkpoint_state(bench, task, fc)
    _, y = bench.split(task, "train")
    seen = training_indices(len(y), fc)
    seen = seen[~torch.isin(seen, head_example_indices(bench, task))]
    _, yt = bench.split(task, "test")
    enc, head = _encoder(bench, state), bench.heads[task]
    gs = per_example_gradient_norms(enc, head, bench.images(task, "train", seen[:n]), y[seen[:n]]).numpy()
    gt = per_example_gradient_norms(enc, head, bench.images(task, "test", torch.arange(n)), yt[:n]).numpy()
    eps = row["bound"] / row["lipschitz"]
    rec = dict(task=task, level=row["level"], step=row["step"], gap=row["gap_vs_pretrained"], ci_low=row["gap_vs_pretrained_ci_low"],
               bound4=row["bound"], L4=row["lipschitz"], eps=eps, seen_mean=float(gs.mean()), seen_max=float(gs.max()),
               test_mean=float(gt.mean()), test_max=float(gt.max()), both_mean=float(np.r_[gs, gt].mean()))
    out.append(rec); print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/lip.json", "w"), indent=1)
