"""Session 8 of the tiny-benchmark design (issue 16): which parameters carry task arithmetic's interference?

Task arithmetic at coefficient lambda with one group of parameters (conv1, attention, MLP, layer norms,
the rest) left at theta_0, on the package's tiny encoder and fine-tuning seed 0's experts (RECIPE: a JSON
object of FinetuneConfig fields over TINY_RECIPE), validation split, per task.

usage: python docs/tiny-benchmark-scratch/interference_groups.py '{}'
"""
import json, sys, torch, yaml
from dataclasses import replace
torch.set_num_threads(1)
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
recipe = replace(TINY_RECIPE, **json.loads(sys.argv[1]))
ex = bench.experts(replace(recipe, seed=0))
tau = {t: {k: ex[t][k] - pre[k] for k in pre} for t in ex}
def group(k):
    if k.startswith("conv1"): return "conv1"
    if "ln_" in k: return "layernorm"
    if "attn" in k: return "attn"
    if "mlp" in k: return "mlp"
    return "other"  # class_embedding, positional_embedding, proj
groups = sorted({group(k) for k in pre})
print({g: sum(pre[k].numel() for k in pre if group(k) == g) for g in groups})
def merged(lam, keep):
    return {k: pre[k] + lam * sum(tau[t][k] for t in tau) if group(k) in keep else pre[k].clone() for k in pre}
for lam in (0.2, 0.3):
    for name, keep in [("all", groups)] + [(f"-{g}", [h for h in groups if h != g]) for g in groups] + [("only mlp+attn", ["mlp", "attn"])]:
        acc = bench.evaluate(merged(lam, keep), "val")
        print(lam, f"{name:16s}", round(sum(acc.values()) / 8, 3), {t: round(a, 2) for t, a in acc.items()}, flush=True)
