"""TSV-C at tiny: which decomposed matrices carry the compression loss? Each group restored in full in turn."""
import json, numpy as np, torch
torch.set_num_threads(1)
import mergelab
from mergelab.params import profile_params
from mergelab.notebook import setup
from mergelab.evaluation import expert_accuracy
from mergelab.experiments.ch03_tsv import compressed_accuracy
from mergelab.merging.tsv import tsv_compress
from mergelab.merging.tsv.compress import CompressedTaskVector
from mergelab.task_vectors import task_vectors_from
ns = dict(profile_params("tiny", "04_mass_routing"))
bench = setup("04_mass_routing", dict(ns)).bench
pre = bench.pretrained_state()
experts = bench.experts(mergelab.FinetuneConfig(**ns["finetune"], seed=ns["seed"]))
tv = task_vectors_from(pre, experts)
ex = expert_accuracy(bench, experts, "test")
comp = {t: tsv_compress(v, num_tasks=len(tv)) for t, v in tv.items()}
keys = list(next(iter(comp.values())).factors)
print({k: next(iter(comp.values())).ranks()[k] for k in keys})
groups = {"none": [], "positional_embedding": [k for k in keys if "positional" in k],
          "attn": [k for k in keys if "attn" in k], "mlp": [k for k in keys if "mlp" in k],
          "proj": [k for k in keys if k == "proj"]}
groups["all but positional"] = [k for k in keys if "positional" not in k]
for name, full in groups.items():
    c2 = {}
    for t, c in comp.items():
        c2[t] = CompressedTaskVector({k: f for k, f in c.factors.items() if k not in full},
                                     {**c.dense, **{k: tv[t][k] for k in full}}, c.shapes)
    acc = compressed_accuracy(bench, pre, tv, "test", compressed=c2)["per_task_accuracy"]
    norm = np.mean([acc[t] / ex[t] for t in tv])
    print(f"{name:22s} restored {len(full):2d} matrices: normalized {norm:.4f}", {t: round(acc[t] / ex[t], 3) for t in tv}, flush=True)
