#!/usr/bin/env bash
# Chapter 06 probe (session 28 of the project): the chapter's ResNet recipe on the tiny benchmark's digits task
# (2,000 training and 1,000 test glyph images, 3 x 32 x 32, 10 classes) instead of scikit-learn's 8 x 8 digits.
# The digits split is swapped in every process (the chapter's jobs run in spawned workers) by task_site/sitecustomize.py.
# Its own data folder: the swapped split keeps the digits' cache key, so it must not share chapter 06's caches.
# Usage (from the repository root): bash docs/c2m3-scratch/task_probe.sh OUT.json   (about 30 minutes on 2 cores)
set -euo pipefail
out=${1:?usage: task_probe.sh OUT.json}
work=$(mktemp -d)
MERGELAB_DATA_DIR=${TINY_DATA:-data} .venv/bin/python -c "
import mergelab, numpy as np
b = mergelab.load_benchmark('tiny', progress=False)
X, y = b.split('digits', 'train'); Xt, yt = b.split('digits', 'test')
np.savez('$work/task.npz', X_train=X.numpy(), y_train=y.numpy(), X_test=Xt.numpy(), y_test=yt.numpy())"
PYTHONPATH=docs/c2m3-scratch/task_site:src MERGELAB_C2M3_PROBE_NPZ=$work/task.npz MERGELAB_DATA_DIR=$work/data \
    .venv/bin/python docs/c2m3-scratch/width_probe.py '{}' "$out"
rm -rf "$work"
