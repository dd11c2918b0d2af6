"""Session 23 diagnostic (issue 16): how much of a tiny task vector is fine-tuning noise, and what merging loses to it.

For each task, the shipped experts of fine-tuning seeds 0, 1, 2 give three task vectors. Their pairwise cosines say
which share of a vector is the same from seed to seed; their mean (a "seed soup") removes most of the rest. Task
arithmetic (coefficient on validation, normalized) and TSV-C (task known) are then run on seed 0's vectors and on the
means, normalized by seed 0's experts (test split). Shipped encoder and runs only: nothing trains (seconds).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session23_seed_noise.py OUT.json
"""
import json
import sys

import numpy as np
import torch

torch.set_num_threads(1)
import mergelab  # noqa: E402
from mergelab.evaluation import expert_accuracy, merge_baselines, normalized_accuracy  # noqa: E402
from mergelab.experiments.ch03_tsv import compressed_accuracy  # noqa: E402
from mergelab.notebook import setup  # noqa: E402
from mergelab.params import profile_params  # noqa: E402
from mergelab.task_vectors import TaskVector, task_vectors_from  # noqa: E402

ns = dict(profile_params("tiny", "00_benchmark_and_baselines"))
bench = setup("00_benchmark_and_baselines", dict(ns)).bench
pre = bench.pretrained_state()
tvs, experts = {}, {}
for s in (0, 1, 2):
    experts[s] = bench.experts(mergelab.FinetuneConfig.from_params(ns["finetune"], seed=s))
    tvs[s] = task_vectors_from(pre, experts[s])
tasks = list(tvs[0])


def flat(v):
    return torch.cat([x.float().flatten() for _, x in v.items()])


out = {"cos": {}, "mean_norm_ratio": {}}
for t in tasks:
    f = [flat(tvs[s][t]) for s in (0, 1, 2)]
    out["cos"][t] = float(np.mean([torch.nn.functional.cosine_similarity(f[i], f[j], 0) for i, j in ((0, 1), (0, 2), (1, 2))]))
    out["mean_norm_ratio"][t] = float((sum(f) / 3).norm() / np.mean([x.norm() for x in f]))
mean_tv = {t: TaskVector({k: sum(tvs[s][t][k] for s in (0, 1, 2)) / 3 for k in tvs[0][t].keys()}) for t in tasks}
ex_test = expert_accuracy(bench, experts[0], "test")
ex_val = expert_accuracy(bench, experts[0], "val")
soup_experts = {t: mean_tv[t].apply_to(pre) for t in tasks}
soup_acc = {t: bench.evaluate(soup_experts[t], "test", tasks=[t])[t] for t in tasks}
out["expert_test"] = ex_test
out["soup_expert_test"] = soup_acc
grid = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0]
for name, vecs in (("seed0", tvs[0]), ("soup", mean_tv)):
    res = merge_baselines(bench, pre, vecs, ["task_arithmetic"], options={"task_arithmetic": {"grid": grid}},
                          progress=False, expert_val=ex_val)["task_arithmetic"]
    acc = bench.evaluate(res.state, "test", tasks=tasks)
    tsvc = compressed_accuracy(bench, pre, vecs, "test", num_tasks=len(vecs))["per_task_accuracy"]
    out[name] = {"ta_coefficient": res.coefficient, "ta_abs": float(np.mean(list(acc.values()))),
                 "ta_norm": normalized_accuracy(acc, ex_test), "ta_per_task": acc,
                 "tsvc_norm": normalized_accuracy(tsvc, ex_test)}
    print(name, {k: v for k, v in out[name].items() if k != "ta_per_task"}, flush=True)
print("cos", {t: round(v, 3) for t, v in out["cos"].items()})
print("soup experts", {t: round(v, 3) for t, v in soup_acc.items()}, "seed-0 experts", {t: round(v, 3) for t, v in ex_test.items()})
json.dump(out, open(sys.argv[1], "w"), indent=1, default=float)
