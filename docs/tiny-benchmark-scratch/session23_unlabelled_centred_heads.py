"""Session 23 of the tiny-benchmark design (session 43 of the project): heads balanced by the task's unlabelled images.

The canonical heads send most of a hard task's images to one class (section 23: shapes .78). Here each task's head
subtracts, from the normalized feature, the mean normalized feature of the task's *unlabelled* training images under
the pretrained encoder (m_t, fixed before fine-tuning; no label is read): logits = s * (normalize(f) - m_t) . p_c,
with the package's canonical prototypes p_c and scale s. While the experts train, m_t stays fixed, so it acts as a
per-class offset -s * m_t . p_c. This uses the tasks' images, as the pretraining's contrastive term already does,
not their labels; CLIP's text heads have no such offset. For comparison, the data-free offset from the canonical
renderings alone (m = the mean of the task's normalized prototypes) is calibrated too. Then chapter 00's seed study at
the fine-tuning seeds given, with the unlabelled offset (experts trained here against these heads: their run keys carry
the heads' digest); SEEDS `zs` stops after the zero-shot calibration.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session23_unlabelled_centred_heads.py SEEDS|zs OUT.json
e.g.   ... session23_unlabelled_centred_heads.py 0 out_s0.json
"""
import hashlib
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
import yaml

torch.set_num_threads(1)

from mergelab.analysis.diagnostics import zero_shot_calibration  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch00_benchmark as ch00  # noqa: E402
from mergelab.models import ClassificationHead, encode  # noqa: E402


class OffsetHead(ClassificationHead):
    def __init__(self, prototypes: torch.Tensor, logit_scale: float, centre: torch.Tensor) -> None:
        super().__init__(prototypes, logit_scale)
        self.register_buffer("centre", centre.detach().float())

    def digest(self) -> str:
        blob = (self.weight.cpu().numpy().tobytes() + self.centre.cpu().numpy().tobytes() + b"unlabelled-centred"
                + repr(self.logit_scale).encode())
        return hashlib.sha256(blob).hexdigest()[:16]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (F.normalize(features, dim=-1) - self.centre) @ self.weight.T


seeds = [] if sys.argv[1] == "zs" else [int(s) for s in sys.argv[1].split(",")]
out = sys.argv[2]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
cfg = TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"], head_shots=p["head_shots"])
package = TinyBenchmark(cfg, device="cpu", progress=False)
bench = TinyBenchmark(cfg, device="cpu", progress=False)
pre = bench.pretrained_state()
enc = bench.new_encoder(pre)
centres = {t: F.normalize(encode(enc, bench.split(t, "train")[0]), dim=-1).mean(0) for t in bench.tasks}
canonical = TinyBenchmark(cfg, device="cpu", progress=False)
canonical._heads = {t: OffsetHead(h.weight.clone(), h.logit_scale, h.weight.mean(0)) for t, h in package.heads.items()}
bench._heads = {t: OffsetHead(h.weight.clone(), h.logit_scale, centres[t]) for t, h in package.heads.items()}
res = {"seeds": seeds}
for name, b in (("package", package), ("canonical_offset", canonical), ("offset", bench)):
    cal = zero_shot_calibration(b, pre, "val")
    res[name] = {t: {k: c[k] for k in ("accuracy", "cross_entropy", "top_class_share")} for t, c in cal.items()}
    print(name, "zero-shot val %.3f" % np.mean([c["accuracy"] for c in cal.values()]),
          json.dumps({t: round(c["top_class_share"], 2) for t, c in cal.items()}), flush=True)
if not seeds:
    json.dump(res, open(out, "w"), indent=1, default=float)
    sys.exit(0)
study = ch00.seed_study(bench, pre, TINY_RECIPE, seeds, progress=False)
res["study"] = study
short = {m: {k: (round(v["mean"], 4), round(v["sd"], 4)) for k, v in s.items()} for m, s in study["summary"].items()}
res["summary_short"] = short
print(json.dumps(short), flush=True)
for seed, rows in study["per_seed"].items():
    print(seed, "TA coefficient", rows["task_arithmetic"].get("coefficient"),
          {t: round(v, 3) for t, v in rows["task_arithmetic"]["per_task_accuracy"].items()}, flush=True)
json.dump(res, open(out, "w"), indent=1, default=float)
