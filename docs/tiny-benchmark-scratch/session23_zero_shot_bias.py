"""Session 23 diagnostic (issue 16): how biased the tiny zero-shot heads are toward one class.

Per task, on the test split: the pretrained encoder with the canonical heads, its accuracy and the share of images
put in the most-predicted class (against 1/C), from the package's `zero_shot_calibration`, and the median margin
(true logit minus the largest other, nats) from `example_margins`. Shipped encoder and heads, nothing trains (seconds).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session23_zero_shot_bias.py
"""
import torch

torch.set_num_threads(1)
from mergelab.analysis.diagnostics import example_margins, zero_shot_calibration  # noqa: E402
from mergelab.notebook import setup  # noqa: E402
from mergelab.params import profile_params  # noqa: E402

ns = dict(profile_params("tiny", "00_benchmark_and_baselines"))
bench = setup("00_benchmark_and_baselines", dict(ns)).bench
pre = bench.pretrained_state()
for t, c in zero_shot_calibration(bench, pre, "test").items():
    margin = float(example_margins(bench, pre, t, "test").median())
    print(f"{t:12s} acc {c['accuracy']:.3f} classes {bench.heads[t].n_classes} "
          f"most-predicted share {c['top_class_share']:.2f} median margin {margin:.2f}")
