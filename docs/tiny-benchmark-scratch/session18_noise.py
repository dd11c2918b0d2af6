"""Session 18 of the tiny-benchmark design (session 30 of the project): the tasks' pixel noise, the encoder unchanged.

The hard tasks' experts do not fit their training split (session 16: digits .80, counting .91), so their margins
end barely past the decision boundary and their own-task curves are straight. This fine-tunes the experts on the
8 tasks drawn with per-pixel Gaussian noise of SD NOISE (`data.noise`; the package's 0.08) from the package's
pretrained encoder (the shipped one, injected: the encoder's contrastive term reads the tasks' images, so it
would otherwise be pretrained again), then runs chapter 00's seed study (weight averaging, task arithmetic,
TSV-M, TSV-C; test split, coefficients on validation) and the own-task diagnostics at one thread.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session18_noise.py NOISE OUT.json [SEEDS, default 0]
"""
import sys

import torch
import yaml

torch.set_num_threads(1)

from lever_record import record_lever_study  # noqa: E402  (this folder: the record every session-18 script writes)
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig  # noqa: E402

noise, out = float(sys.argv[1]), sys.argv[2]
seeds = [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
package = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                        head_shots=p["head_shots"]), device="cpu", progress=False)
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data={**p["data"], "noise": noise}, model=p["model"],
                                                      pretrain=p["pretrain"], head_shots=p["head_shots"]),
                      device="cpu", progress=False)
bench._pretrained = package.pretrained_state()  # the package's encoder, not one pretrained on the noisier or cleaner images
pre = bench.pretrained_state()
record_lever_study(bench, pre, seeds, out, {"noise": noise, "encoder_sha256": package.pretrained_sha256})
