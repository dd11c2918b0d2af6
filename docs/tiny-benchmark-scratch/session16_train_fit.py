"""Session 16 of the tiny-benchmark design (session 26 of the project): the experts of fine-tuning seed 0 on their
training and test splits (accuracy, cross-entropy) and the mean loss of their last 20 training batches.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_train_fit.py
"""
import json, sys, yaml, torch
from dataclasses import replace
torch.set_num_threads(2)
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
experts = bench.experts(replace(TINY_RECIPE, seed=0))
for t, st in experts.items():
    tr = bench.evaluations(st, "train", [t])[t]; te = bench.evaluations(st, "test", [t])[t]
    log = bench.expert_log(t, replace(TINY_RECIPE, seed=0))
    print(t, "train acc %.3f loss %.3f | test acc %.3f loss %.3f | last-20 train-batch loss %.3f" % (tr["accuracy"], tr["loss"], te["accuracy"], te["loss"], sum(log["loss"][-20:])/20))
