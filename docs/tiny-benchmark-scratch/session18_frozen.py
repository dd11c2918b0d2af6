"""Session 18 of the tiny-benchmark design (session 30 of the project): experts fine-tuned with part of the encoder
frozen (attention only, MLP only, all but the stem, all but the patch stem): a measurement, not yet the benchmark.

Jin et al. (ICLR 2025, "Fine-tuning attention modules only") report that task vectors of the attention modules
alone are more weight-disentangled, so task arithmetic keeps more of each expert. The public benchmark fine-tunes
the whole image tower, and the tiny size follows it; this asks whether the tiny size's straight own-task curves
(session 16) and its interference move when only ``attn.in_proj`` and ``attn.out_proj`` train. The shipped
encoder, TINY_RECIPE, fine-tuning seed 0, chapter 00's seed study (test split, coefficients on validation) and
the own-task diagnostics, at one thread. Run it in an empty data folder with MERGELAB_FINETUNE=1: the experts'
cache keys are the full fine-tuning's (the freezing is patched in), so shipped or cached full experts must
not be found.

MODE (default ``attention``) says what trains: ``attention`` (``.attn.`` parameters), ``mlp`` (``.mlp.``
parameters), ``no_stem`` (everything but the patch stem, class and positional embeddings and ``ln_pre``),
``no_conv1`` (everything but the patch stem ``conv1``), ``all`` (everything: the package's fine-tuning, for a
reference on another pretraining draw). PRETRAIN_SEED (default: the package's, whose encoder ships) pretrains
another draw of the encoder first (about 8 minutes at one thread).

usage: MERGELAB_FINETUNE=1 MERGELAB_DATA_DIR=<empty> python docs/tiny-benchmark-scratch/session18_frozen.py OUT.json [MODE [SEEDS, default 0 [PRETRAIN_SEED]]]
"""
import sys

import torch
import yaml

torch.set_num_threads(1)

import mergelab.benchmarks.tiny.benchmark as tiny  # noqa: E402
from lever_record import record_lever_study  # noqa: E402  (this folder: the record every session-18 script writes)
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig  # noqa: E402

full_finetune = tiny.finetune


MODE = sys.argv[2] if len(sys.argv) > 2 else "attention"
STEM = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
TRAINS = {"attention": lambda n: ".attn." in n, "mlp": lambda n: ".mlp." in n,
          "no_stem": lambda n: not n.startswith(STEM), "no_conv1": lambda n: not n.startswith("conv1."),
          "all": lambda n: True}[MODE]


def partly_frozen(model, *args, **kwargs):
    for name, p in model.named_parameters():
        p.requires_grad_(TRAINS(name))
    try:
        return full_finetune(model, *args, **kwargs)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


tiny.finetune = partly_frozen
out = sys.argv[1]
seeds = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
if len(sys.argv) > 4:
    p["pretrain"] = {**p["pretrain"], "seed": int(sys.argv[4])}
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                      head_shots=p["head_shots"]), device="cpu", progress=False)
pre = bench.pretrained_state()
record_lever_study(bench, pre, seeds, out, {"variant": MODE, "pretrain": p["pretrain"],
                                            "encoder_sha256": bench.pretrained_sha256},
                   lambda tvs: {"frozen_but_changed": sorted({k for t in tvs.values() for k, v in t.items()
                                                             if float(v.abs().max()) > 0 and not TRAINS(k)})})
