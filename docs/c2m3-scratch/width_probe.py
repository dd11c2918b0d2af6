"""Chapter 06 probe: does C2M3 with REPAIR beat MergeMany with REPAIR on narrower ResNets?

Usage: MERGELAB_DATA_DIR=/tmp/c2m3data python width_probe.py '<json of resnet recipe overrides>' out.json
Trains 5 ResNets (cached) with the tiny recipe plus the overrides, merges every set of 3 of them with every
method of the chapter, and writes per-set accuracies and the across-set summary.
"""
import json
import sys
import time

from mergelab.executors import make_executor
from mergelab.experiments.ch06_c2m3 import across_sets, merge_study
from mergelab.experiments.ch06_models import train_all
from mergelab.params import profile_params


def main():
    params = profile_params("tiny", "06_cycle_consistent_merging")
    recipe = {**params["architectures"]["resnet"], **json.loads(sys.argv[1])}
    start = time.time()
    ex = make_executor("local", workers=2, threads=1)
    trained = train_all({"resnet": recipe}, params["num_models"], params["seed"], params["digits"], executor=ex)
    t_train = time.time() - start
    study = merge_study(trained, 3, [3], params["digits"], params["frank_wolfe"], params["seed"],
                        merge_sets={"resnet": 10}, executor=ex)
    summary = across_sets(study.sets, "resnet")
    means = study.sets.drop(columns=["architecture", "models"]).mean().to_dict()
    out = {"recipe": recipe, "train_s": t_train, "total_s": time.time() - start, "across_sets": summary, "mean_accuracy": means,
           "sets": study.sets.to_dict(orient="records")}
    json.dump(out, open(sys.argv[2], "w"), indent=1)
    print(json.dumps({"recipe": recipe, "summary": {k: v for k, v in summary.items() if k != "per_set"}, "means": means}, indent=1))


if __name__ == '__main__':
    main()
