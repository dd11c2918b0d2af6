"""Session 23 diagnostic (issue 16): canonical heads offset by the canonical renderings' own mean (data-free).

Per task, validation split: zero-shot accuracy, the most-predicted class's share and cross-entropy of the package's
heads, and of the same heads with the mean of their normalized prototypes subtracted from each normalized feature
before the dot product (logits = s * (normalize(f) - mean_c p_c) . p_c). Seconds; nothing trains.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session23_canonical_offset_zero_shot.py
"""
import torch, numpy as np, torch.nn.functional as F
torch.set_num_threads(1)
from mergelab.params import profile_params
from mergelab.notebook import setup
ns = dict(profile_params("tiny", "00_benchmark_and_baselines"))
bench = setup("00_benchmark_and_baselines", dict(ns)).bench
enc = bench.new_encoder(bench.pretrained_state()).eval()
heads = bench.heads
tot = {"plain": [], "offset": []}
for t in ns["tasks"]:
    x, y = bench.split(t, "val")
    with torch.no_grad():
        f = F.normalize(enc(bench.images(t, "val", torch.arange(len(y)))), dim=-1)
    h = heads[t]; W = h.weight; s = h.logit_scale
    m = W.mean(0)  # mean of the normalized prototypes (canonical renderings only)
    for name, lg in (("plain", s * f @ W.T), ("offset", s * (f - m) @ W.T)):
        p = lg.argmax(-1); C = lg.shape[1]
        share = np.bincount(p.numpy(), minlength=C) / len(p)
        acc = float((p == y).float().mean()); tot[name].append(acc)
        ce = float(F.cross_entropy(lg, y))
        print(f"{t:12s} {name:6s} acc {acc:.3f} max share {share.max():.2f} CE {ce:.2f}")
print({k: round(float(np.mean(v)), 3) for k, v in tot.items()})
