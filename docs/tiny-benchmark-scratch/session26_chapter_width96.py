"""Session 26 of the tiny-benchmark design (session 46 of the project): one chapter at width 96, on the encoder and
experts that head_lever.py made in the same data folder (MERGELAB_DATA_DIR): the chapter's tiny parameters with the
model at width 96 and the pretraining draw given, through the runner's execute_notebook.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session26_chapter_width96.py NOTEBOOK OUT_DIR [PRETRAIN_SEED]
(results: session26_p0_width96_ch04.json, session26_p1_width96_ch04.json, session26_p0_width96_ch03.json,
session26_p0_width96_ch05.json, session26_p0_width96_ch01.json; the first two were made by this script's first version, which ran chapter 04 only)
"""
import sys
from pathlib import Path

from mergelab import paths, report

name, out = sys.argv[1], Path(sys.argv[2])
params = report.profile_params("tiny", name)
params["model"] = {**params["model"], "width": 96, "output_dim": 96}
if len(sys.argv) > 3:
    params["pretrain"] = {**params["pretrain"], "seed": int(sys.argv[3])}
(out / "results").mkdir(parents=True, exist_ok=True)
print(report.execute_notebook(paths.notebooks_dir() / f"{name}.ipynb", params, out))
