"""Session 24 gate (issue 16, ranked list item 2, its last untried part): a masked-patch target beside the
contrastive term on the tasks' unlabelled images, read by the linear probe before any expert trains.

Each step of the contrastive term (`mergelab.training.pretrain._contrastive_term`, patched here, nothing in the
package changes) also takes the next `unlabelled_batch` task images (their labels never read), replaces a random
`RATIO` of each image's patch tokens (the output of `conv1`) by one learnt mask token, and predicts the masked
patches' pixels from the transformer's output tokens through a LayerNorm and a linear decoder (SimMIM-style; pixel
targets normalized per patch, as MAE's `norm_pix_loss`; mean squared error over the masked patches). The term is
added to the contrastive one, so it is weighted by `unlabelled_weight` (.5) times `FACTOR`. Mask token and decoder
are dropped afterwards, as the projection head is.

Pretrains draw PRETRAIN_SEED with the package's tiny parameters on the pinned two threads, then runs chapter 00's
validated linear probe on it and on the shipped encoder in the same process (one thread).

usage: MERGELAB_DATA_DIR=EMPTY_DIR python docs/tiny-benchmark-scratch/session24_masked_patch_gate.py PRETRAIN_SEED RATIO FACTOR OUT.json [NUM_STEPS]
"""
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import mergelab.training.pretrain as P
from mergelab.analysis.diagnostics import linear_probe_fits
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig
from mergelab.training.finetune import batch_stream
from mergelab.utils import torch_threads

seed, ratio, factor, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
steps = {"num_steps": int(sys.argv[5]), "warmup_steps": 1} if len(sys.argv) > 5 else {}  # a quick check of the script only
masked_losses: list[float] = []
original = P._contrastive_term


def with_masked_patches(model, unlabelled, cfg, normalize, dim, device):
    projection, contrast = original(model, unlabelled, cfg, normalize, dim, device)
    assert model.transformer.batch_first, "the tokens are read batch-first"
    width, p = model.conv1.out_channels, model.conv1.kernel_size[0]
    parts = nn.ModuleDict({"projection": projection,
                           "decoder": nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 3 * p * p))}).to(device)
    parts.mask = nn.Parameter(0.02 * torch.randn(width, generator=torch.Generator().manual_seed(30_000 + seed)))
    g = torch.Generator().manual_seed(40_000 + cfg.seed)  # which patches
    batches = batch_stream(len(unlabelled), cfg.unlabelled_batch, 50_000 + cfg.seed)  # which images

    def masked() -> torch.Tensor:
        x = unlabelled[batches()]
        b, grid = len(x), x.shape[-1] // p
        tokens = grid * grid
        mask = torch.rand(b, tokens, generator=g).argsort(1) < round(ratio * tokens)  # exactly that many per image
        seen = {}

        def replace(module, args, output):  # (B, width, grid, grid) -> masked tokens replaced by the mask token
            flat = output.flatten(2).transpose(1, 2)
            flat = torch.where(mask.to(flat.device)[..., None], parts.mask.to(flat.dtype).expand_as(flat), flat)
            return flat.transpose(1, 2).reshape(output.shape)

        handles = [model.conv1.register_forward_hook(replace),
                   model.transformer.register_forward_hook(lambda m, a, o: seen.__setitem__("tokens", o))]
        try:
            model(normalize(x).to(device))
        finally:
            for h in handles:
                h.remove()
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, tokens, 3 * p * p)
        target = patches[mask]
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = parts.decoder(seen["tokens"][:, 1:][mask.to(device)])
        loss = F.mse_loss(pred, target.to(device))
        masked_losses.append(float(loss.detach()))
        return loss

    return parts, lambda: contrast() + factor * masked()


P._contrastive_term = with_masked_patches
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
res = {"pretrain_seed": seed, "mask_ratio": ratio, "factor": factor}
for name in ("variant", "package"):
    cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain={**p["pretrain"], "seed": seed, **(steps if name == "variant" else {})},
                                          head_shots=p["head_shots"])
    bench = TinyBenchmark(cfg, device="cpu", progress=False)
    start = time.perf_counter()
    if name == "variant":
        with torch_threads(bench.pretrain_threads):
            pre, log = bench._pretrain_here()
        res["factor_loss_last100"] = float(np.mean(log["loss"][-100:]))
        res["masked_loss_first100"] = float(np.mean(masked_losses[:100]))
        res["masked_loss_last100"] = float(np.mean(masked_losses[-100:]))
        torch.save(pre, out.replace(".json", ".pt"))
    else:
        pre = bench.pretrained_state()
    wall = time.perf_counter() - start
    with torch_threads(1):
        probe = {t: r["accuracy"] for t, r in linear_probe_fits(bench, pre, cache=False, progress=False).items()}
    res[name] = {"pretrain_wall_s": round(wall, 1), "probe": probe, "probe_mean": float(np.mean(list(probe.values())))}
    print(name, json.dumps({k: round(v, 3) for k, v in probe.items()}), "mean %.3f" % res[name]["probe_mean"],
          "pretrain %.0f s" % wall, flush=True)
gate = ("digits", "shapes", "position")
res["gate_change"] = {t: res["variant"]["probe"][t] - res["package"]["probe"][t] for t in gate}
print("gate change", json.dumps({k: round(v, 3) for k, v in res["gate_change"].items()}),
      "mean %+.3f" % np.mean(list(res["gate_change"].values())), flush=True)
json.dump(res, open(out, "w"), indent=1)
