"""Package-path measurement of the tiny benchmark (issue 16): TinyBenchmark -> pretrained encoder ->
linear probe, zero-shot calibration -> experts (cached by the package) -> TA / WA / TSV-M / TSV-C.

usage: python scratch/final.py '{"seeds": [0], "ft_lr": 5e-4, "stage": "all"}'
"""
import json, math, os, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
import mergelab
from dataclasses import replace
from mergelab.benchmark import TinyBenchmark, TinyBenchmarkConfig, TINY_RECIPE
from mergelab.tinydata import TinyDataConfig, TASKS
from mergelab.models import TinyViTConfig
from mergelab.training import FinetuneConfig, PretrainConfig
from mergelab.task_vectors import task_vectors_from
from mergelab.merging import merge
from mergelab import diagnostics as D
from mergelab.tsv import tsv_compress, tsv_reconstruct, tsv_update

C = dict(seeds=[0], stage="all", n_pretext=20000, pre={}, model={}, scale=None, ft={}, tag="run")
C.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
say = lambda *a: print(*a, flush=True)
base = TinyBenchmarkConfig()
cfg = replace(base, data=TinyDataConfig(n_pretext=C["n_pretext"]), model=TinyViTConfig(**C["model"]),
              pretrain=replace(base.pretrain, **C["pre"]),
              logit_scale=C["scale"] if C["scale"] is not None else base.logit_scale)
bench = TinyBenchmark(cfg, device="cpu", progress=False)
tasks = list(TASKS)
log = {"cfg": C, "bench_key": bench.key}
t0 = time.time(); pre = bench.pretrained_state(); plog = bench.pretraining_log()
L = plog["loss"]
say("pretrain wall", round(plog["wall_time_s"], 1), "steps", len(L), "loss first/last100",
    round(float(np.mean(L[:10])), 3), round(float(np.mean(L[-100:])), 3),
    "loss at 50%/75%", round(float(np.mean(L[len(L)//2-50:len(L)//2+50])), 3), round(float(np.mean(L[3*len(L)//4-50:3*len(L)//4+50])), 3))
log["pretrain"] = {"wall_s": plog["wall_time_s"], "final_loss": float(np.mean(L[-100:]))}
lp = D.linear_probe(bench, pre)
lp = {t: round(float(v), 3) for t, v in lp.items()}
say("linear probe", lp, "mean", round(float(np.mean(list(lp.values()))), 3))
log["linear_probe"] = lp
zc = D.zero_shot_calibration(bench, pre, split="test")
say("zero-shot calib (test)", {t: {k: round(float(v), 3) for k, v in d.items()} for t, d in zc.items()})
log["zero_shot_calibration"] = zc
if C["stage"] == "probe":
    json.dump(log, open(f"scratch/logs/final-{C['tag']}.json", "w"), indent=1, default=float); sys.exit()

def ev(state, split="test", ts=None): return bench.evaluate(state, split, ts or tasks)
def mean(d): return float(np.mean(list(d.values())))
def norm(d, ref): return float(np.mean([d[t] / ref[t] for t in tasks]))
results = []
for seed in C["seeds"]:
    fcfg = replace(TINY_RECIPE, seed=seed, **C["ft"])
    times = {}
    experts = {}
    for t in tasks:
        s = time.time(); experts[t] = bench.expert(t, fcfg); times[t] = round(time.time() - s, 1)
    say("seed", seed, "expert wall s", times)
    tvs = task_vectors_from(pre, experts)
    exp_test = {t: ev(experts[t], "test", [t])[t] for t in tasks}
    exp_val = {t: ev(experts[t], "val", [t])[t] for t in tasks}
    zs_val, zs_test = ev(pre, "val"), ev(pre, "test")
    say("experts test", {t: round(v, 3) for t, v in exp_test.items()}, "mean", round(mean(exp_test), 3))
    pn = math.sqrt(sum(float((v.double() ** 2).sum()) for v in pre.values() if v.is_floating_point()))
    rel = {t: round(tvs[t].norm() / pn, 4) for t in tasks}
    tvl = [tvs[t] for t in tasks]
    grid = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
    ta_val = {a: norm(ev(merge("task_arithmetic", pre, tvl, coefficient=a) if a > 0 else pre, "val"), exp_val) for a in grid}
    a_ta = max(ta_val, key=ta_val.get)
    ta_test = ev(merge("task_arithmetic", pre, tvl, coefficient=a_ta) if a_ta > 0 else pre)
    wa_test = ev(merge("weight_averaging", pre, tvl))
    upd = tsv_update(tvl, device="cpu")
    def tsv_at(a): return {k: (pre[k] + a * upd[k].to(pre[k].dtype)) if k in upd else pre[k] for k in pre}
    tgrid = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 2.5, 3.0]
    tsv_val = {a: norm(ev(tsv_at(a), "val"), exp_val) for a in tgrid}
    a_tsv = max(tsv_val, key=tsv_val.get)
    tsv_test = ev(tsv_at(a_tsv))
    tsvc = {t: ev(tsv_reconstruct(tsv_compress(tvs[t], num_tasks=len(tasks))).apply_to(pre, 1.0), "test", [t])[t] for t in tasks}
    r = dict(seed=seed, experts=mean(exp_test), zero_shot=mean(zs_test), ta=mean(ta_test), ta_alpha=a_ta,
             ta_norm=norm(ta_test, exp_test), wa=mean(wa_test), tsv=mean(tsv_test), tsv_alpha=a_tsv,
             tsvc_norm=norm(tsvc, exp_test), ta_val_curve={str(k): round(v, 3) for k, v in ta_val.items()},
             tsv_val_curve={str(k): round(v, 3) for k, v in tsv_val.items()}, rel=rel, exp_test=exp_test,
             ta_test=ta_test, expert_wall=times)
    say(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("exp_test", "ta_test", "expert_wall")}))
    results.append(r)
    log["results"] = results
    json.dump(log, open(f"scratch/logs/final-{C['tag']}.json", "w"), indent=1, default=float)
keys = ["experts", "zero_shot", "ta", "ta_norm", "wa", "tsv", "tsvc_norm"]
log["summary"] = {k: [round(float(np.mean([r[k] for r in results])), 3), round(float(np.std([r[k] for r in results])), 3)] for k in keys}
lpm = float(np.mean(list(lp.values())))
say("SUMMARY", log["summary"], "lp/exp", round(lpm / log["summary"]["experts"][0], 3))
json.dump(log, open(f"scratch/logs/final-{C['tag']}.json", "w"), indent=1, default=float)
