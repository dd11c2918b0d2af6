"""Session 3 of the tiny-benchmark design (issue 16): one pretraining lever, gated by the linear probe.

Pretrains the tiny encoder exactly as the package does (`TinyBenchmark._pretrain`, `factors` objective,
the package's pretext pool and PretrainConfig), with one change named on the command line, then
reports the final loss and the linear probe on the 8 tasks (`analysis.diagnostics.linear_probe`).

Levers:
  base       the package as it is (the reference; probe .611 in session 2)
  occupancy  16 more binary targets: does any object's centre lie in each cell of the 4x4 patch grid
             (position of every object, not only the largest one's), learnt with the strokes' BCE
  lr3e-3     pretraining learning rate 3e-3 instead of 2e-3 (the loss is still falling at the end)
  strokes8   strokes (and occupancy) BCE weight 8 instead of 4
  width96    the encoder's width and output dimension 96 instead of 64 (heads 4; 1.6x the step cost)
  kinds      8 more binary targets: is an object of each generator in the scene (every object's kind,
             not only the largest one's), learnt with the strokes' BCE
  inkmap     (session 4) 4,000 more pretext scenes: a handwritten glyph of scikit-learn's digits drawn
             as the digits task draws it, from the training split's base digits only (the labels are
             never read), whose target is the glyph's own 4x4 ink map (its 8x8 image average-pooled 2x2,
             in the glyph's frame, so independent of where it is drawn), 16 soft targets learnt with
             the strokes' BCE; every other target of these scenes is unknown (ignored)
Levers combine with "+", e.g. occupancy+lr3e-3.

usage (its own data folder per lever, one torch thread):
  MERGELAB_DATA_DIR=/tmp/lever python docs/tiny-benchmark-scratch/lever_probe.py occupancy out.json [chain]
With "chain", the encoder is stored where the package's TinyBenchmark looks for its pretrained weights
(in that data folder only) and chapter 00's seed study runs on it: experts (TINY_RECIPE, seed 0),
zero-shot, task arithmetic and weight averaging validated by normalized accuracy, TSV-M, TSV-C.
"""
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

torch.set_num_threads(1)

from mergelab.analysis import diagnostics as D  # noqa: E402
from mergelab.benchmarks.tiny import data as tinydata, pretext  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.models import build_tiny_encoder  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import normalize_images  # noqa: E402
from mergelab.training import pretrain_factors  # noqa: E402

lever, out = sys.argv[1], sys.argv[2]
levers = set(lever.split("+"))
unknown = levers - {"base", "occupancy", "lr3e-3", "strokes8", "kinds", "width96", "inkmap"}
if unknown:
    raise SystemExit(f"unknown lever(s) {sorted(unknown)}")
cfg = TinyBenchmarkConfig()
if "width96" in levers:
    cfg = replace(cfg, model=replace(cfg.model, width=96, output_dim=96))
if "lr3e-3" in levers:
    cfg = replace(cfg, pretrain=replace(cfg.pretrain, lr=3e-3))

centres: list[list[tuple[float, float]]] = []
if levers & {"occupancy", "kinds"}:  # record every object's centre and kind, scene by scene (one _background call per scene)
    _bg, _obj = pretext._background, pretext._draw_object

    def background(rng):
        centres.append([])
        return _bg(rng)

    def draw_object(rng, img, kind, cx, cy, r, colour):
        centres[-1].append((cx, cy, kind))
        return _obj(rng, img, kind, cx, cy, r, colour)

    pretext._background, pretext._draw_object = background, draw_object

start = time.perf_counter()
X, targets = pretext._draw_pretext(np.random.default_rng([cfg.data.seed, 999]), cfg.data.n_pretext, cfg.data.noise)
print("scenes", X.shape, round(time.perf_counter() - start, 1), "s", flush=True)
targets = {k: torch.from_numpy(v) for k, v in targets.items()}
if levers & {"occupancy", "kinds"}:
    assert len(centres) == len(X)
    occ = np.zeros((len(X), 16), np.float32)
    present = np.zeros((len(X), len(pretext.PRETEXT_KINDS)), np.float32)
    for i, cs in enumerate(centres):
        for cx, cy, kind in cs:
            occ[i, 4 * min(int(cy // 8), 3) + min(int(cx // 8), 3)] = 1
            present[i, pretext.PRETEXT_KINDS.index(kind)] = 1
    extra = [m for name, m in (("occupancy", occ), ("kinds", present)) if name in levers]
    targets["strokes"] = torch.cat([targets["strokes"], *map(torch.from_numpy, extra)], 1)  # BCE, NaN entries ignored
if "inkmap" in levers:
    from sklearn.datasets import load_digits

    glyphs = load_digits().images.astype(np.float32) / 16.0
    order = np.random.default_rng(12345).permutation(len(glyphs))  # the digits task's split of base digits
    pool = order[: int(0.6 * len(order))]  # its training split only
    rng = np.random.default_rng([cfg.data.seed, 4242])
    n_ink = 4000
    xs, inks = [], []
    for _ in range(n_ink):
        i = pool[rng.integers(len(pool))]
        glyph = np.kron(glyphs[i], np.ones((3, 3), np.float32))
        img = tinydata._plain(rng, None, (0.0, 0.3), (0.0, 0.15))
        oy, ox = rng.integers(0, tinydata.IMAGE_SIZE - 24 + 1, size=2)
        colour = tinydata._hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.85, 1.0))
        region = img[oy:oy + 24, ox:ox + 24]
        img[oy:oy + 24, ox:ox + 24] = region * (1 - glyph[..., None]) + colour * glyph[..., None]
        xs.append(tinydata._finish(img, rng, cfg.data.noise))
        inks.append(glyphs[i].reshape(4, 2, 4, 2).mean(axis=(1, 3)).reshape(16))
    n0 = len(X)
    X = np.concatenate([X, np.stack(xs).astype(np.float32)])
    nan = torch.full((n_ink,), float("nan"))
    targets["kind"] = torch.cat([targets["kind"], torch.full((n_ink,), -100, dtype=torch.int64)])
    targets["texture"] = torch.cat([targets["texture"], torch.full((n_ink,), -100, dtype=torch.int64)])
    targets["regression"] = torch.cat([targets["regression"], torch.full((n_ink, targets["regression"].shape[1]), float("nan"))])
    ink = torch.cat([torch.full((n0, 16), float("nan")), torch.from_numpy(np.stack(inks))])
    strokes = torch.cat([targets["strokes"], torch.full((n_ink, targets["strokes"].shape[1]), float("nan"))])
    targets["strokes"] = torch.cat([strokes, ink], 1)
    print("ink scenes", n_ink, "pool", len(X), flush=True)
torch.manual_seed(cfg.pretrain.seed)
enc = build_tiny_encoder(cfg.model)
classes = {"kind": len(pretext.PRETEXT_KINDS), "texture": len(pretext.PRETEXT_TEXTURES)}
start = time.perf_counter()
losses = pretrain_factors(enc, torch.from_numpy(X), targets, classes, cfg.pretrain, normalize_images, progress=False,
                          strokes_weight=8.0 if "strokes8" in levers else 4.0)
cpu = time.perf_counter() - start
bench = TinyBenchmark(cfg, device="cpu", progress=False)
probe = D.linear_probe(bench, enc.state_dict())
res = {"lever": lever, "pretrain_wall_s": round(cpu, 1), "loss_last100": float(np.mean(losses[-100:])),
       "probe": {t: round(float(v), 3) for t, v in probe.items()}, "probe_mean": round(float(np.mean(list(probe.values()))), 3)}
print(json.dumps(res), flush=True)
json.dump(res, open(out, "w"), indent=1)
if len(sys.argv) > 3 and sys.argv[3] == "chain":
    from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE
    from mergelab.experiments import ch00_benchmark as ch00

    bench._pretrained_artifact.save(enc.state_dict(), {"lever": lever, "loss": losses, "wall_time_s": cpu})
    bench._pretrained = None
    pre = bench.pretrained_state()
    start = time.perf_counter()
    study = ch00.seed_study(bench, pre, TINY_RECIPE, [0], progress=False)
    rows = study["per_seed"]["0"]
    res["chain"] = {name: {k: round(float(r[k]), 3) for k in ("absolute_accuracy", "normalized_accuracy")}
                    | ({"coefficient": r["coefficient"]} if "coefficient" in r else {}) for name, r in rows.items()}
    for name in ("experts", "zero_shot", "task_arithmetic"):
        res["chain"][f"{name}_per_task"] = {t: round(float(v), 3) for t, v in rows[name]["per_task_accuracy"].items()}
    res["chain_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(res["chain"]), flush=True)
    json.dump(res, open(out, "w"), indent=1)
