"""Session 16 of the tiny-benchmark design (session 26 of the project): more training images per task for the
experts, the encoder unchanged.

The hard tasks' experts generalize .10-.16 below their training accuracy on 2,000 images per task, and their test
margins end barely past the decision boundary (session16_margins.py). This fine-tunes the experts on N training
images per task (`data.n_train`) from the package's pretrained encoder of n_train 2,000 (the shipped one: the
encoder normally depends on n_train, since its contrastive term reads the tasks' training images; here it is
injected so that only the experts' data change), then runs chapter 00's seed study (weight averaging, task
arithmetic, TSV-M, TSV-C; test split, coefficients on validation) and the own-task diagnostics at one thread.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session16_train_pool.py N_TRAIN OUT.json [SEEDS, default 0]
"""
import sys

import torch
import yaml

torch.set_num_threads(1)

from lever_record import record_lever_study  # noqa: E402  (this folder: the study and record of every lever script)
from mergelab.benchmarks.tiny.benchmark import TinyBenchmark, TinyBenchmarkConfig  # noqa: E402

n_train, out = int(sys.argv[1]), sys.argv[2]
seeds = [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0]
p = yaml.safe_load(open("params/tiny/_benchmark.yaml"))
package = TinyBenchmark(TinyBenchmarkConfig.from_params(data=p["data"], model=p["model"], pretrain=p["pretrain"],
                                                        head_shots=p["head_shots"]), device="cpu", progress=False)
bench = TinyBenchmark(TinyBenchmarkConfig.from_params(data={**p["data"], "n_train": n_train}, model=p["model"],
                                                      pretrain=p["pretrain"], head_shots=p["head_shots"]),
                      device="cpu", progress=False)
bench._pretrained = package.pretrained_state()  # the package's encoder, not one pretrained on the larger pool
pre = bench.pretrained_state()
record_lever_study(bench, pre, seeds, out, {"n_train": n_train, "encoder_sha256": package.pretrained_sha256})
