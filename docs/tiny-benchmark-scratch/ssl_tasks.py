"""Session 6 lever (issue 16): the tasks' unlabelled training images in pretraining, with a contrastive term.

Superseded since session 7 by the package's own term (`PretrainConfig.unlabelled_weight`, `view_*`;
`training.pretrain.task_view`), which `params/tiny` uses at weight .5; to try other settings, pass a `pretrain`
key to `head_lever.py`. Kept to reproduce session 6's runs: it patches the package's pretraining loop and builds
its projection head from another random state than the package does, so its encoders differ from the package's.

Web pretraining sees images of the downstream domains without their labels. This lever keeps the package's
`factors` pretraining (same pool, targets, PretrainConfig, steps) and adds, at every step, a symmetric InfoNCE
term (weight 1, temperature .2, a 2-layer projection head dropped afterwards) on 64 *unlabelled* images drawn
from the 8 tasks' training splits (never their labels, never validation or test), each seen as two views
that keep what the tasks ask for: a shift of at most 3 pixels (reflect-padded crop) and a brightness jitter
of +-10 %; no flips (orientation), no channel shuffles (colours). A step costs about twice the package's.

The encoder is stored where the package's TinyBenchmark looks for it in MERGELAB_DATA_DIR (set it to a
folder of its own), then `head_lever.py` runs chapter 00's seed study on it (probe, zero-shot calibration,
three fine-tuning seeds).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/ssl_tasks.py PRETRAIN_SEED OUT.json [SHIFT [NOISE [WEIGHT]]]
SHIFT (default 3) is the largest shift in pixels (0: none); NOISE (default 0) the SD of Gaussian pixel noise
added to each view (the variant that keeps position: SHIFT 0, NOISE .05); WEIGHT (default 1) that of the
contrastive term.
"""
import json
import runpy
import sys
import time

import torch
import yaml
from torch import nn

torch.set_num_threads(1)

from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig, normalize_images  # noqa: E402
from mergelab.benchmarks.tiny.data import PRETEXT_KINDS, PRETEXT_TEXTURES, TASKS, load_pretext, load_task  # noqa: E402
from mergelab.models import build_tiny_encoder  # noqa: E402
from mergelab.training import pretrain as P  # noqa: E402

pre_seed, out = int(sys.argv[1]), sys.argv[2]
max_shift = int(sys.argv[3]) if len(sys.argv) > 3 else 3
noise = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
weight = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
OFF = {"unlabelled_weight": 0.0}  # the package's own term off: this script adds its own (and head_lever.py reads the same key)
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain={**p["pretrain"], "seed": pre_seed, **OFF},
                                      head_shots=p["head_shots"])
bench = TinyBenchmark(cfg, device="cpu", progress=False)
if not bench._pretrained_artifact.path.exists():
    unlabelled = torch.cat([torch.from_numpy(load_task(t, "train", cfg.data)[0]) for t in TASKS])  # (16000, 3, 32, 32)
    g = torch.Generator().manual_seed(10_000 + pre_seed)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = P.shift_crop(x, max_shift, g)
        x = x * (1 + 0.2 * (torch.rand(x.shape[0], 1, 1, 1, generator=g) - 0.5))
        return (x + noise * torch.randn(x.shape, generator=g) if noise else x).clamp(0, 1)

    original = P.pretrain_factors
    head = nn.Sequential(nn.Linear(cfg.model.output_dim, 64), nn.ReLU(), nn.Linear(64, 64))

    def loop_with_ssl(model, params, pcfg, n, step_loss, desc, progress):
        def both(idx):
            x = unlabelled[torch.randint(0, len(unlabelled), (64,), generator=g)]
            z1, z2 = head(model(normalize_images(view(x)))), head(model(normalize_images(view(x))))
            return step_loss(idx) + weight * P.info_nce(z1, z2, 0.2)
        return original_loop(model, params + list(head.parameters()), pcfg, n, both, desc + " + ssl", progress)

    original_loop = P._pretrain_loop
    P._pretrain_loop = loop_with_ssl
    torch.manual_seed(cfg.pretrain.seed)
    enc = build_tiny_encoder(cfg.model)
    X, targets = load_pretext(cfg.data)
    start = time.perf_counter()
    losses = original(enc, torch.from_numpy(X), {k: torch.from_numpy(v) for k, v in targets.items()},
                      {"kind": len(PRETEXT_KINDS), "texture": len(PRETEXT_TEXTURES)}, cfg.pretrain, normalize_images,
                      progress=False)
    P._pretrain_loop = original_loop
    bench._pretrained_artifact.save(enc.state_dict(), {"lever": "ssl_tasks", "loss": losses,
                                                       "wall_time_s": time.perf_counter() - start})
    print("pretrained", round(time.perf_counter() - start, 1), "s; loss last 100", sum(losses[-100:]) / 100, flush=True)
sys.argv = ["head_lever.py", str(pre_seed), json.dumps({"pretrain": OFF}), "{}", out]
runpy.run_path("docs/tiny-benchmark-scratch/head_lever.py", run_name="__main__")
