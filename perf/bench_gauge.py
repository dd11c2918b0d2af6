"""The machine's speed on the work the ``tiny`` book does most, to read a wall time beside.

The same suite or book takes up to about twice as long on one day's 2-core machine as on another's
(docs/tiny-benchmark.md, "Wall times"), so a wall time alone says little about a change. This script
measures the two operations most of the tiny chapters' CPU goes to, on one torch thread as the chapters
run them, with the tiny encoder's default shape (:class:`mergelab.models.TinyViTConfig`), random weights
and random images (nothing is read from or written to the data folder):

1. **Evaluation**: images per second of the encoder's forward pass in eval mode under ``torch.no_grad``, at
   the tiny benchmark's evaluation batch (:attr:`TinyBenchmark.EVAL_BATCH_SIZE`, 128).
2. **A fine-tuning step**: milliseconds per AdamW step at batch 64 (forward, cross-entropy through a fixed
   linear head, backward, update), as :func:`mergelab.training.finetune` runs them.

Each is timed over ``--rounds`` rounds after one warm-up round; the median and the range are printed.
Usage: ``python perf/bench_gauge.py [--rounds 5] [--images 2048] [--steps 20] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def measure(rounds: int, images: int, steps: int, seed: int = 0) -> dict:
    """``{"eval_images_per_s": [...], "train_step_ms": [...], ...}``: one value per round (after a warm-up), on one
    torch thread; the caller's thread count and global random state are restored afterwards."""
    import torch

    from mergelab.benchmarks.tiny import TinyBenchmark
    from mergelab.models import TinyViTConfig, build_tiny_encoder
    from mergelab.report.timings import cpu_model, usable_cores
    from mergelab.utils import torch_threads

    cfg, batch = TinyViTConfig(), TinyBenchmark.EVAL_BATCH_SIZE
    with torch_threads(1), torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = build_tiny_encoder(cfg)
        X = torch.rand(images, 3, cfg.image_size, cfg.image_size)
        head = torch.nn.Linear(cfg.output_dim, 10).requires_grad_(False)
        Xt, yt = torch.rand(64, 3, cfg.image_size, cfg.image_size), torch.randint(0, 10, (64,))
        opt = torch.optim.AdamW(encoder.parameters(), lr=1e-4, weight_decay=0.1)

        def evaluation() -> float:
            encoder.eval()
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, images, batch):
                    encoder(X[i:i + batch])
            return images / (time.perf_counter() - start)

        def training() -> float:
            encoder.train()
            start = time.perf_counter()
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(head(encoder(Xt)), yt).backward()
                opt.step()
            return 1000 * (time.perf_counter() - start) / steps

        evaluation(), training()  # warm-up: thread pool, allocator, kernels chosen
        out = {"eval_images_per_s": [], "train_step_ms": []}
        for _ in range(rounds):
            out["eval_images_per_s"].append(evaluation())
            out["train_step_ms"].append(training())
    return {**out, "eval_batch": batch, "train_batch": 64, "torch_threads": 1, "torch": torch.__version__,
            "cpu": cpu_model(), "cores": usable_cores(), "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each operation (default 5)")
    parser.add_argument("--images", type=int, default=2048, help="images per evaluation round (default 2048)")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per round (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("rounds", "images", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is not valid: give a whole number of at least 1")
    r = measure(args.rounds, args.images, args.steps)
    print(f"{r['cpu']}, {r['cores']} cores, torch {r['torch']}, one thread, load average {r['load_average']:.2f}")
    for key, label, unit in (("eval_images_per_s", f"evaluation, batch {r['eval_batch']}", "images/s"),
                             ("train_step_ms", f"fine-tuning step, batch {r['train_batch']}", "ms")):
        v = r[key]
        print(f"| {label} | median {statistics.median(v):,.1f} {unit} | range {min(v):,.1f}-{max(v):,.1f} "
              f"| {len(v)} rounds |")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
