"""Session 29 of the tiny-benchmark design (session 49 of the project): fine-tuning recipes that freeze more of the
encoder than the package's patch stem, through the package's own ``FinetuneConfig.frozen`` (the runs' cache keys
name what is frozen, so nothing shipped or cached for the package's recipe is read). A measurement, not the
benchmark.

MODE says what changes from ``TINY_RECIPE`` (``conv1`` frozen, AdamW 5e-4, 300 steps x 64):
``proj``: the output projection ``proj`` frozen too (every task's head reads the embedding it makes);
``attn_lr1e-3``: the attention modules alone train (Jin et al., ICLR 2025), at twice the learning rate, same steps;
``attn600``: the attention modules alone train, 600 steps (warm-up 60);
``late2``: the last two of the four blocks and ``ln_post`` train, with ``proj`` (the stem, the embeddings and the first
two blocks frozen).

Chapter 00's seed study on the shipped encoder (test split, coefficients on validation by normalized accuracy),
then the own-task curves of the first seed, at one thread, into OUT (JSON) with a one-line summary.

usage: MERGELAB_DATA_DIR=<folder> python docs/tiny-benchmark-scratch/session29_recipes.py OUT.json MODE [SEEDS, default 0]
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

torch.set_num_threads(1)

from mergelab.analysis.diagnostics import gain_fraction, own_task_curve  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402
from mergelab.models import build_tiny_encoder  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
seeds = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]
names = [n for n, _ in build_tiny_encoder().named_parameters()]
not_attention = tuple(n for n in names if ".attn." not in n)
recipe = {"proj": replace(TINY_RECIPE, frozen=("conv1", "proj")),
          "attn_lr1e-3": replace(TINY_RECIPE, frozen=not_attention, lr=1e-3),
          "attn600": replace(TINY_RECIPE, frozen=not_attention, num_steps=600, warmup_steps=60),
          "late2": replace(TINY_RECIPE, frozen=("class_embedding", "conv1", "ln_pre", "positional_embedding",
                                                "transformer.resblocks.0", "transformer.resblocks.1"))}[mode]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                      head_shots=p["head_shots"]), device="cpu", progress=False)
pre = bench.pretrained_state()
start = time.perf_counter()
study = ch00.seed_study(bench, pre, recipe, seeds, merge_methods=("weight_averaging", "task_arithmetic"),
                        progress=False)
tvs = task_vectors_from(pre, bench.experts(replace(recipe, seed=seeds[0])))
moved_frozen = sorted(k for t in tvs.values() for k, v in t.items() if k in recipe.frozen or
                      any(k.startswith(f + ".") for f in recipe.frozen) if float(v.abs().max()) > 0)
curve = own_task_curve(bench, pre, tvs)
summary = study["summary"]
short = {m: (round(summary[m]["absolute_accuracy"]["mean"], 3), round(summary[m]["normalized_accuracy"]["mean"], 3))
         for m in ("zero_shot", "experts", "weight_averaging", "task_arithmetic", "tsv_merge_validated", "tsv_compress")}
short["ta_coefficient"] = [study["per_seed"][str(s)]["task_arithmetic"]["coefficient"] for s in seeds]
short["gain_0.3_mean"] = round(float(np.nanmean([gain_fraction(c, 0.3) for c in curve.values()])), 3)
res = {"mode": mode, "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(recipe).items()},
       "seeds": seeds, "encoder_sha256": bench.pretrained_sha256, "frozen_but_moved": moved_frozen,
       "wall_s": round(time.perf_counter() - start, 1), "seed_study": study,
       "per_task_test": {m: study["per_seed"][str(seeds[0])][m]["per_task_accuracy"]
                         for m in ("zero_shot", "experts", "task_arithmetic")}, "short": short}
print(json.dumps(short), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
