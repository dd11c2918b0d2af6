"""Session 13 exploration (issue 16): the linear probe at C=10 against C chosen on validation (L-BFGS, grid 0.1..1e4), before the package adopted diagnostics.validated_probe (Newton-Cholesky, grid 1e-2..1e6). Usage: MERGELAB_DATA_DIR=... python probe_c_grid.py out.json"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from mergelab.params import profile_params
from mergelab.notebook import setup
from mergelab.analysis.diagnostics import _features
from sklearn.linear_model import LogisticRegression
ns = dict(profile_params("tiny", "00_benchmark_and_baselines"))
session = setup("00_benchmark_and_baselines", dict(ns))
bench = session.bench
enc = bench.new_encoder(bench.pretrained_state())
grid = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
out = {}
for task in bench.tasks:
    F = {s: (_features(bench, enc, bench.split(task, s)[0]).double().numpy(), bench.split(task, s)[1].numpy()) for s in ("train", "val", "test")}
    row = {}
    for C in grid:
        clf = LogisticRegression(max_iter=3000, C=C).fit(*F["train"])
        row[C] = (clf.score(*F["val"]), clf.score(*F["test"]))
    best = max(grid, key=lambda c: (row[c][0], -c))
    out[task] = {"C10_test": row[10.0][1], "best_C": best, "best_val": row[best][0], "best_test": row[best][1],
                 "by_C": {str(c): row[c] for c in grid}}
    print(task, out[task]["C10_test"], best, out[task]["best_test"], {c: round(v[1], 3) for c, v in row.items()}, flush=True)
print("mean C=10", np.mean([o["C10_test"] for o in out.values()]), "mean val-chosen", np.mean([o["best_test"] for o in out.values()]))
json.dump(out, open(sys.argv[1], "w"), indent=1)
