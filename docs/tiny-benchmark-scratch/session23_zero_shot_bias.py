"""Session 23 diagnostic (issue 16): how biased the tiny zero-shot heads are toward one class.

Per task, on the test split: the pretrained encoder with the canonical heads, its accuracy, the share of images put
in the most-predicted class (against 1/C) and the median margin (true logit minus the largest other, nats).
Shipped encoder and heads, nothing trains (seconds).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session23_zero_shot_bias.py
"""
import torch, numpy as np
torch.set_num_threads(1)
from mergelab.params import profile_params
from mergelab.notebook import setup
ns = dict(profile_params("tiny", "00_benchmark_and_baselines"))
bench = setup("00_benchmark_and_baselines", dict(ns)).bench
enc = bench.new_encoder(bench.pretrained_state()).eval()
heads = bench.heads
for t in ns["tasks"]:
    x, y = bench.split(t, "test")
    idx = torch.arange(len(y))
    with torch.no_grad():
        f = enc(bench.images(t, "test", idx))
        lg = heads[t](f)
    p = lg.argmax(-1)
    C = lg.shape[1]
    share = np.bincount(p.numpy(), minlength=C) / len(p)
    m = lg.gather(1, y.view(-1,1)).squeeze(1) - lg.scatter(1, y.view(-1,1), -1e9).max(1).values
    print(f"{t:12s} acc {float((p==y).float().mean()):.3f} pred-share max {share.max():.2f} (classes {C}) median margin {float(m.median()):.2f} pred shares {np.round(share,2)}")
