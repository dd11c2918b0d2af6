"""Session 24: why chapter 04's router sends other tasks' inputs to colours. Builds the router as chapter 04 does
(tiny parameters, chapter 00's experts, fine-tuning seed 0), takes the routing features (class token at block 3's
MLP input, first pass TSV-M of all tasks) of every task's validation images, and per router task t reports: the
share of each input task's feature energy inside t's stored subspace (mean over images of ||V_t^T x||^2 / ||x||^2),
the share of the features' common direction (their mean over all tasks' images, normalized) inside it, and the
same shares once that common direction is removed from the features (each x minus its projection on it).

usage: MERGELAB_DATA_DIR=DIR python docs/tiny-benchmark-scratch/session24_routing_subspaces.py OUT.json
"""
import json
import sys

import numpy as np
import torch
import yaml

torch.set_num_threads(1)
import mergelab  # noqa: E402
from mergelab.experiments import ch04_mass as ch04  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.merging.mass import routing_weights, select_tasks, subspace_residuals  # noqa: E402

out = sys.argv[1]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
q = yaml.safe_load(open("params/tiny/04_mass_routing.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
experts = bench.experts(mergelab.FinetuneConfig.from_params(q["finetune"], seed=0))
tvs = task_vectors_from(pre, experts)
compressed = ch04.compress_tasks(tvs, svd=q["svd"])
router = ch04.make_router(bench, pre, compressed, depth=q["depth"], routing_matrix=q["routing_matrix"],
                          threshold=q["threshold"], top_k=q["top_k"], cache_size=q["cache_size"])
tasks = list(router.tasks)
V = router.bases.float()  # (T, d, k): each task's stored right singular vectors of the routing matrix
feats = {t: router.features(bench.images(t, "val", list(range(len(bench.split(t, "val")[1]))))) for t in tasks}
allx = torch.cat(list(feats.values()))
mu = allx.mean(0)
mu_hat = mu / mu.norm()
res = {"tasks": tasks, "rank": int(V.shape[-1]), "dim": int(V.shape[1]),
       "common_share_of_energy": float(((allx @ mu_hat) ** 2).sum() / (allx ** 2).sum())}


def shares(x):  # (N, d) -> (T,) mean share of each x's energy inside each task's subspace
    proj = torch.einsum("nd,tdk->ntk", x, V)
    return ((proj ** 2).sum(-1) / (x ** 2).sum(-1, keepdim=True)).mean(0)


def routed(x):  # share of inputs whose selected set contains each router task, and argmax share
    w = routing_weights(subspace_residuals(x, V))
    sel = select_tasks(w, q["threshold"], q["top_k"])
    contains = torch.zeros(len(tasks))
    for s in sel:
        contains[list(s)] += 1
    return (contains / len(x)).tolist(), torch.bincount(w.argmax(1), minlength=len(tasks)).div(len(x)).tolist()


res["common_direction_share_in_subspace"] = dict(zip(tasks, ((mu_hat @ V) ** 2).sum(-1).tolist()))
res["energy_share"] = {t: dict(zip(tasks, shares(feats[t]).tolist())) for t in tasks}
centred = {t: x - (x @ mu_hat)[:, None] * mu_hat for t, x in feats.items()}
res["energy_share_without_common"] = {t: dict(zip(tasks, shares(centred[t]).tolist())) for t in tasks}
res["selected"] = {t: dict(zip(tasks, routed(feats[t])[0])) for t in tasks}
res["argmax"] = {t: dict(zip(tasks, routed(feats[t])[1])) for t in tasks}
res["contains_true"] = float(np.mean([res["selected"][t][t] for t in tasks]))
# the routing MASS would do on features with the common direction removed (not MASS: a diagnostic)
res["selected_without_common"] = {t: dict(zip(tasks, routed(centred[t])[0])) for t in tasks}
res["argmax_without_common"] = {t: dict(zip(tasks, routed(centred[t])[1])) for t in tasks}
res["contains_true_without_common"] = float(np.mean([res["selected_without_common"][t][t] for t in tasks]))
res["argmax_true"] = float(np.mean([res["argmax"][t][t] for t in tasks]))
res["argmax_true_without_common"] = float(np.mean([res["argmax_without_common"][t][t] for t in tasks]))
json.dump(res, open(out, "w"), indent=1)
r3 = lambda d: {k: round(v, 3) for k, v in d.items()}
print("common direction's share of the features' energy %.3f" % res["common_share_of_energy"])
print("common direction inside each subspace", r3(res["common_direction_share_in_subspace"]))
for t in tasks:
    print(t, "energy in subspaces", r3(res["energy_share"][t]))
print("contains true %.3f, argmax %.3f; without the common direction %.3f, %.3f" % (
    res["contains_true"], res["argmax_true"], res["contains_true_without_common"], res["argmax_true_without_common"]))
print("colours in the selected set, per input task", r3({t: res["selected"][t]["colours"] for t in tasks}))
print("... without the common direction", r3({t: res["selected_without_common"][t]["colours"] for t in tasks}))
