"""Session 26 of the tiny-benchmark design (session 46 of the project): the cost of a training step and of an
evaluation batch of the tiny encoder at width 64 and width 96, one thread, random weights and images.

usage: python docs/tiny-benchmark-scratch/session26_width_step_cost.py            (training step and evaluation)
       python docs/tiny-benchmark-scratch/session26_width_step_cost.py fastpath   (evaluation, torch's attention fast
                                                                                   path on and off)
Output of the session's runs: session26_width_step_cost.txt.
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mergelab.models import TinyViTConfig, build_tiny_encoder

torch.set_num_threads(1)


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def encoder(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny_encoder(TinyViTConfig(width=width, output_dim=width))


def eval_ms(enc: torch.nn.Module, repeats: int) -> float:
    xe = torch.randn(256, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        return median_ms(lambda: enc(xe), 3, repeats)


if len(sys.argv) > 1 and sys.argv[1] == "fastpath":
    for fast in (True, False, True, False):
        torch.backends.mha.set_fastpath_enabled(fast)
        for width in (64, 96):
            print("fastpath", fast, "width", width, "eval 256 ms", round(eval_ms(encoder(width), 10), 1))
else:
    res = {}
    for width in (64, 96, 64, 96):
        enc = encoder(width)
        head = torch.nn.Linear(width, 10)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=1e-4)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(head(enc(x)), y).backward()
            opt.step()

        res.setdefault(width, []).append((median_ms(step, 5, 30), eval_ms(enc, 15)))
    for w, v in res.items():
        print(w, "train step (batch 64) ms", [round(a, 1) for a, _ in v], "eval 256 ms", [round(b, 1) for _, b in v])
