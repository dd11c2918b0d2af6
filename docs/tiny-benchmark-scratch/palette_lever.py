"""Session 9 of the tiny-benchmark design (issue 16): each task's objects drawn from a hue band of its own.

Five tasks (counting, position, textures, orientation, size) and digits' glyphs drew their objects'
hue uniformly, so each of their experts may learn to ignore the factor the colours task reads, and the
domains overlap in colour where the 8 public datasets differ. This sets
`mergelab.benchmarks.tiny.data.OBJECT_HUES` (empty in the package) to PALETTE, which enters every key that
depends on the data (`data.generator_key`; session 9 ran before it did, with a scratch generator version), runs `head_lever.py` (chapter 00's
seed study at one pretraining seed) and adds chapter 00's per-task decomposition (own vector alone
against the merge, validation, fine-tuning seed 0, at task arithmetic's validated lambda).

usage: python docs/tiny-benchmark-scratch/palette_lever.py PRETRAIN_SEED PALETTE OUT.json
PALETTE: a JSON object task -> hue centre, or a name of PRESETS.
"""
import json
import runpy
import sys
from dataclasses import replace
from pathlib import Path

PRESETS = {
    # hues chosen apart from each domain's background hue (position .62, size .08, orientation .33)
    "bands": {"digits": 0.15, "counting": 0.0, "position": 0.5, "textures": 0.83,
              "orientation": 0.92, "size": 0.72},
}

pre_seed, palette, out = sys.argv[1], sys.argv[2], sys.argv[3]
palette = PRESETS[palette] if palette in PRESETS else json.loads(palette)

from mergelab.benchmarks.tiny import benchmark as tb, data as td  # noqa: E402

td.OBJECT_HUES.update(palette)
here = Path(__file__).parent
sys.argv = [str(here / "head_lever.py"), pre_seed, "{}", "{}", out]
g = runpy.run_path(str(here / "head_lever.py"), run_name="__main__")

from mergelab.analysis.diagnostics import alone_and_merged  # noqa: E402
from mergelab.task_vectors import task_vectors_from  # noqa: E402

bench, pre, res = g["bench"], g["pre"], g["res"]
experts = bench.experts(replace(tb.TINY_RECIPE, seed=0))
lam = res["seeds_study"]["per_seed"]["0"]["task_arithmetic"]["coefficient"]
res["palette"] = palette
res["alone_and_merged_seed0"] = {"coefficient": lam,
                                 "per_task": alone_and_merged(bench, pre, task_vectors_from(pre, experts), lam, "val")}
print(json.dumps(res["alone_and_merged_seed0"]), flush=True)
Path(out).write_text(json.dumps(res, indent=1, default=float))
