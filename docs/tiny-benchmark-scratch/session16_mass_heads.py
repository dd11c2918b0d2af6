"""Session 16 of the tiny-benchmark design (session 26 of the project), issue 19: why MASS's head choice picks the
colours head for other tasks' inputs (chapter 04's `confusion["head"]`).

Prints (1) each head's mean max logit on each task's test images (300 per task) on the pretrained features and on
the first pass's TSV-M of all tasks at alpha 1; (2) for digits, shapes, size and textures, on the second-pass model
of {task, colours} (MASS's stored factors, `MassRouter.model_for`), how often the colours head's max logit beats the
task's own head over the task's first 400 test images, and how often the own head is right there. Fine-tuning seed 0.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_mass_heads.py
"""
from dataclasses import replace

import torch
import yaml

torch.set_num_threads(2)

from mergelab.analysis.diagnostics import _encode  # noqa: E402
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE, TinyBenchmark, TinyBenchmarkConfig  # noqa: E402
from mergelab.experiments import ch04_mass as ch04  # noqa: E402
from mergelab.merging import merge  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                      head_shots=p["head_shots"]), device="cpu", progress=False)
pre = bench.pretrained_state()
tvs = task_vectors_from(pre, bench.experts(replace(TINY_RECIPE, seed=0)))
tasks = list(tvs)
for name, state in (("pretrained", pre),
                    ("tsv_merge of all tasks, alpha 1", merge("tsv_merge", pre, list(tvs.values()), coefficient=1.0))):
    enc = bench.new_encoder(state)
    print(name, "- mean max logit of each head (columns) on each task's test images (rows)")
    print(" " * 12 + " ".join(f"{h[:8]:>8}" for h in tasks))
    for t in tasks:
        X, _ = bench.split(t, "test")
        with torch.no_grad():
            f = _encode(bench, enc, X[:300])
            row = [float(bench.heads[h](f).max(-1).values.mean()) for h in tasks]
        print(f"{t[:11]:>11} " + " ".join(f"{v:8.2f}" for v in row))
router = ch04.make_router(bench, pre, ch04.compress_tasks(tvs))
for t in ("digits", "shapes", "size", "textures"):
    model = router.model_for(sorted([t, "colours"]))
    X, y = bench.split(t, "test")
    with torch.no_grad():
        f = model(X[:400])
        own, col = bench.heads[t](f), bench.heads["colours"](f)
    om, cm = own.max(-1).values, col.max(-1).values
    print(f"{t}: second pass of {{{t}, colours}}: mean max logit own head {float(om.mean()):.2f}, colours head "
          f"{float(cm.mean()):.2f}; colours head larger for {float((cm > om).float().mean()):.0%}; own head right "
          f"{float((own.argmax(-1) == y[:400]).float().mean()):.0%}")
