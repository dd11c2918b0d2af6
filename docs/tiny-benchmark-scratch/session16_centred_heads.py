"""Session 16 of the tiny-benchmark design (session 26 of the project): canonical heads centred consistently.

The heads' geometry, not their scale, sets where the examples an expert gains cross the decision boundary
(alpha* = -m0 / (m1 - m0) is invariant to the logit scale). The shapes head is a hub (zero-shot puts most images in
one class, margins of -6 nats). Here both the normalized features and the canonical prototypes are centred on the
prototypes' mean mu before the cosine: logits = s * normalize(normalize(f) - mu) . normalize(p_c - mu). Built from the
canonical renderings only, before fine-tuning, like the package's heads. Zero-shot calibration and margins first
(`zs`), then (`study`) the experts of seed 0 fine-tuned against these heads and chapter 00's seed study.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_centred_heads.py zs|study OUT.json
"""
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

torch.set_num_threads(1)

from mergelab.analysis.diagnostics import (example_margins, gain_fraction, margin_linearity, own_task_curve,  # noqa: E402
                                           zero_shot_calibration)
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402
from mergelab.models import ClassificationHead  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402


class CentredHead(ClassificationHead):
    def __init__(self, prototypes: torch.Tensor, logit_scale: float) -> None:
        mu = prototypes.mean(0)
        super().__init__(prototypes - mu, logit_scale)
        self.register_buffer("centre", mu.detach().float())

    def digest(self) -> str:
        blob = (self.weight.cpu().numpy().tobytes() + self.centre.cpu().numpy().tobytes() + b"centred"
                + repr(self.logit_scale).encode())
        return hashlib.sha256(blob).hexdigest()[:16]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(F.normalize(features, dim=-1) - self.centre, dim=-1) @ self.weight.T


mode, out = sys.argv[1], sys.argv[2]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
package = TinyBenchmark(cfg, device="cpu", progress=False)
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
bench._heads = {t: CentredHead(h.weight.clone() * 1.0, h.logit_scale) for t, h in package.heads.items()}
# package.heads' rows are the normalized prototypes; their mean is mu
res = {"mode": mode}
for name, b in (("package", package), ("centred", bench)):
    cal = zero_shot_calibration(b, pre, "val")
    m0 = {t: example_margins(b, pre, t, "val") for t in b.tasks}
    res[name] = {"zero_shot_val": {t: c["accuracy"] for t, c in cal.items()},
                 "cross_entropy": {t: c["cross_entropy"] for t, c in cal.items()},
                 "top_class_share": {t: c["top_class_share"] for t, c in cal.items()},
                 "wrong_margin_median": {t: float(m[m <= 0].median()) for t, m in m0.items()}}
    print(name, json.dumps({k: {t: round(v, 2) for t, v in d.items()} for k, d in res[name].items()}), flush=True)
if mode == "study":
    study = ch00.seed_study(bench, pre, TINY_RECIPE, [0], merge_methods=("weight_averaging", "task_arithmetic"),
                            progress=False)
    tvs = task_vectors_from(pre, bench.experts(replace(TINY_RECIPE, seed=0)))
    curve = own_task_curve(bench, pre, tvs)
    margins = margin_linearity(bench, pre, tvs, curve=curve)
    rows = study["per_seed"]["0"]
    res["study"] = study
    res["margin_linearity"] = margins
    short = {m: (round(rows[m]["absolute_accuracy"], 3), round(rows[m]["normalized_accuracy"], 3), rows[m].get("coefficient"))
             for m in ("zero_shot", "experts", "weight_averaging", "task_arithmetic", "tsv_merge_validated", "tsv_compress")}
    short["gain_0.3_mean"] = round(float(np.nanmean([gain_fraction(c, 0.3) for c in curve.values()])), 3)
    short["crossing_median"] = {t: round(r["crossing_median"], 2) for t, r in margins.items()}
    short["per_task_ta"] = rows["task_arithmetic"]["per_task_accuracy"]
    short["per_task_experts"] = rows["experts"]["per_task_accuracy"]
    res["short"] = short
    print(json.dumps(short), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
