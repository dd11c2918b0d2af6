"""The record every lever script writes (imported by ``session16_train_pool.py``, ``session18_noise.py`` and
``session18_frozen.py``, which run from this folder): chapter 00's seed study on the lever's benchmark (test split, coefficients on
validation; weight averaging, task arithmetic, TSV-M, TSV-C), the own-task curves and margins of the first seed's
experts, and a one-line summary printed and kept under ``short``."""
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mergelab.analysis.diagnostics import gain_fraction, margin_linearity, own_task_curve
from mergelab.benchmarks.tiny.benchmark import TINY_RECIPE
from mergelab.experiments import ch00_benchmark as ch00
from mergelab.task_vectors import task_vectors_from


def record_lever_study(bench, pre, seeds, out, header, task_vector_facts=None):
    """Run the study on ``bench`` from ``pre``; write ``{**header, "seeds", **task_vector_facts(task vectors),
    "wall_s", "seed_study", "gain_at_0.3", "margin_linearity", "per_task_test", "short"}`` to ``out``."""
    start = time.perf_counter()
    study = ch00.seed_study(bench, pre, TINY_RECIPE, seeds, merge_methods=("weight_averaging", "task_arithmetic"),
                            progress=False)
    tvs = task_vectors_from(pre, bench.experts(replace(TINY_RECIPE, seed=seeds[0])))
    facts = task_vector_facts(tvs) if task_vector_facts is not None else {}
    curve = own_task_curve(bench, pre, tvs)
    margins = margin_linearity(bench, pre, tvs, curve=curve)
    res = {**header, "seeds": seeds, **facts, "wall_s": round(time.perf_counter() - start, 1), "seed_study": study,
           "gain_at_0.3": {t: gain_fraction(c, 0.3) for t, c in curve.items()}, "margin_linearity": margins,
           "per_task_test": {m: study["per_seed"][str(seeds[0])][m]["per_task_accuracy"]
                             for m in ("zero_shot", "experts", "task_arithmetic")}}
    summary = study["summary"]
    short = {m: (round(summary[m]["absolute_accuracy"]["mean"], 3), round(summary[m]["normalized_accuracy"]["mean"], 3))
             for m in ("zero_shot", "experts", "weight_averaging", "task_arithmetic", "tsv_merge_validated",
                       "tsv_compress")}
    short["ta_coefficient"] = [study["per_seed"][str(s)]["task_arithmetic"]["coefficient"] for s in seeds]
    short["gain_0.3_mean"] = round(float(np.nanmean(list(res["gain_at_0.3"].values()))), 3)
    short["crossing_median"] = {t: round(r["crossing_median"], 2) for t, r in margins.items()}
    res["short"] = short
    print(json.dumps(short), flush=True)
    Path(out).write_text(json.dumps(res, indent=1, default=float))
    return res
