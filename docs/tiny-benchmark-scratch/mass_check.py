"""Session 11 (issue 16/19): MASS routing and accuracy (chapter 04's defaults, test split) on a lever's encoder and
fine-tuning seed 0's experts, in the data folder the lever ran in (its encoder and experts are cached there).

usage: MERGELAB_DATA_DIR=<the lever's folder> python docs/tiny-benchmark-scratch/mass_check.py aligned|offset|package PRETRAIN_SEED
(since session 11 the package draws digits aligned: `package` on a folder of `head_lever.py`, `offset` on one of
`digits_offset_lever.py`)
Session 11's figures (aligned digits): draw 0 routing .977 (digits 1.0), MASS normalized .792, oracle head .863;
draw 1 routing .950 (digits .988), .757, .843. The package's draw 0 before it: routing .873 (digits .221), .708, .812.
"""
import json, runpy, sys
from dataclasses import replace
import torch
torch.set_num_threads(1)
lever = sys.argv[1]; pre_seed = int(sys.argv[2])
if lever in ("aligned", "offset"):  # the lever's data in this process (package: the package's own)
    script = {"aligned": "digits_layout_lever.py", "offset": "digits_offset_lever.py"}[lever]
    exec(open(__file__.replace("mass_check.py", script)).read().split("pre_seed, out =")[0])
import yaml
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig
from mergelab.experiments import ch04_mass as ch04
from mergelab.evaluation import expert_accuracy, summarize
from mergelab.task_vectors import task_vectors_from
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain={**p["pretrain"], "seed": pre_seed}, head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
experts = bench.experts(replace(TINY_RECIPE, seed=0))
tvs = task_vectors_from(pre, experts)
expert_test = expert_accuracy(bench, experts, "test")
compressed = ch04.compress_tasks(tvs, svd="gram")
router = ch04.make_router(bench, pre, compressed, depth=0.75, routing_matrix="mlp.c_fc", threshold=0.2, top_k=3, cache_size=128)
mass = ch04.evaluate_mass(router, bench, "test", batch_size=256, seed=0, progress=False, examples=0)
r = mass["routing"]
out = {"routing_contains_true": r["contains_true"], "argmax_true": r["argmax_true"], "per_task_contains_true": r["per_task_contains_true"],
       "mass": summarize(mass["per_task_accuracy"], expert_test)["normalized_accuracy"],
       "mass_oracle_head": summarize(mass["oracle_head_accuracy"], expert_test)["normalized_accuracy"]}
print(json.dumps(out))
