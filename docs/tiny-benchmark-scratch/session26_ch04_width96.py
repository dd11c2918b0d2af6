"""Session 26 of the tiny-benchmark design (session 46 of the project): chapter 04 (MASS) at width 96, on the encoder
and experts that head_lever.py made in the same data folder (MERGELAB_DATA_DIR), through the runner's execute_notebook.

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/session26_ch04_width96.py OUT_DIR [PRETRAIN_SEED]
(results: session26_p0_width96_ch04.json, session26_p1_width96_ch04.json)
"""
import sys, json
from pathlib import Path
from mergelab import paths, report
params = report.profile_params("tiny", "04_mass_routing")
params["model"] = {**params["model"], "width": 96, "output_dim": 96}
if len(sys.argv) > 2: params["pretrain"] = {**params["pretrain"], "seed": int(sys.argv[2])}
out = Path(sys.argv[1]); (out / "results").mkdir(parents=True, exist_ok=True)
print(report.execute_notebook(paths.notebooks_dir() / "04_mass_routing.ipynb", params, out))
