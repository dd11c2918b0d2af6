"""Chapter 06 probe (issue 21, session 26 of the project): do Frank-Wolfe and MergeMany reach different C2M3
objectives, and does the difference follow the merges' accuracy?

The chapter now reports C2M3's objective at both methods' maps (`alignment_objective`, `objective_c2m3`,
`objective_merge_many`). This probe adds what the chapter does not keep: Frank-Wolfe's objective at its soft optimum
before rounding, so that a lower score than MergeMany's can be told apart as a local optimum or a rounding loss. It
reruns both alignments on every set of 3 of the chapter's 5 tiny models (cached: run chapter 06 at tiny first) and
prints them beside the chapter's accuracies (from its results file).

usage: MERGELAB_DATA_DIR=... python docs/c2m3-scratch/objective_probe.py RESULTS_JSON OUT.json
"""
import itertools
import json
import sys
from pathlib import Path

import torch
import yaml

torch.set_num_threads(1)

from mergelab.alignment import c2m3_frank_wolfe, merge_many, objective_at  # noqa: E402
from mergelab.experiments import ch06_c2m3 as ch  # noqa: E402

results, out = json.loads(Path(sys.argv[1]).read_text()), sys.argv[2]
p = yaml.safe_load(open("params/tiny/06_cycle_consistent_merging.yaml"))
seed = yaml.safe_load(open("params/tiny/_benchmark.yaml"))["seed"]
trained = ch.train_all(p["architectures"], p["num_models"], seed, p["digits"])
by_set = {(r["architecture"], r["models"]): r for r in results["merge_sets"]}
rows = []
for arch, t in trained.items():
    for members in itertools.combinations(range(p["num_models"]), p["merge_models"]):
        key = (arch, ",".join(map(str, members)))
        if key not in by_set:
            continue
        states = [t.states[i] for i in members]
        mm = merge_many(t.spec, states, seed=seed)
        fw = c2m3_frank_wolfe(t.spec, states, seed=seed, **p["frank_wolfe"])
        r = by_set[key]
        row = {"architecture": arch, "models": key[1], "f_c2m3": fw.objective_rounded,
               "f_merge_many": objective_at(t.spec, states, mm), "f_c2m3_soft_final": fw.objective[-1],
               **{k: r[k] for k in ("c2m3", "merge_many", "c2m3_repair", "merge_many_repair")}}
        row["f_difference"] = row["f_c2m3"] - row["f_merge_many"]
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
Path(out).write_text(json.dumps(rows, indent=1))
