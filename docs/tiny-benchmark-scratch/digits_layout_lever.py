"""Session 11 of the tiny-benchmark design (issue 16): the digits glyph aligned with the patch grid.

Digits is the task that holds `tiny` back everywhere: its expert reaches .365 (the others .72-1.0), its
linear probe .28, MASS routes only .22 of its images to it. Its 24x24 glyph (scikit-learn's 8x8 digit
upscaled 3x) sits at a random offset of 0-8 pixels, so the patch grid (8 pixels) cuts it at 64 phases,
and 2000 training images cover each phase thinly (session 3: centring to +-1 pixel lifted the expert by
.17 on the encoder of that time). MNIST in the public benchmark is centred and upscaled 8x, so a patch sees
a fixed part of the digit. `aligned` upscales the glyph 4x to the whole 32x32 image: each 8-pixel patch
holds exactly 2x2 of the digit's pixels, at one phase; background, colour and noise are drawn as before.
The canonical heads render the same layout. It replaces the generator of the digits task and the canonical
digits images in this process, moves `GENERATOR_VERSION` (so every key that depends on the data differs
from the package's), and runs `head_lever.py` (chapter 00's seed study at one pretraining seed, pretraining
on the new data); `mass_check.py` then measures MASS on the same folder. Session 11 adopted it: from
generator version 6 the package draws digits this way, so this script now reproduces the package's data
under another key.

usage: MERGELAB_DATA_DIR=<empty dir> MERGELAB_PRETRAIN=1 python docs/tiny-benchmark-scratch/digits_layout_lever.py PRETRAIN_SEED OUT.json
"""
import runpy
import sys
from pathlib import Path

import numpy as np

from mergelab.benchmarks.tiny import benchmark as tb, data as td

SCALE = 4  # 8x8 glyph -> 32x32, the whole image


def draw_digits_aligned(rng, n, noise, split_index):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32) / 16.0, digits.target
    order = np.random.default_rng(12345).permutation(len(labels))  # the package's disjoint pools
    cut1, cut2 = int(0.6 * len(order)), int(0.75 * len(order))
    pool = (order[:cut1], order[cut1:cut2], order[cut2:])[split_index]
    xs, ys = [], []
    for _ in range(n):
        i = pool[rng.integers(len(pool))]
        glyph = np.kron(images[i], np.ones((SCALE, SCALE), np.float32))
        img = td._plain(rng, None, (0.0, 0.3), (0.0, 0.15))
        colour = td._hsv(td._object_hue(rng, "digits"), rng.uniform(0.3, 1.0), rng.uniform(0.85, 1.0))
        img = img * (1 - glyph[..., None]) + colour * glyph[..., None]
        xs.append(td._finish(img, rng, noise))
        ys.append(labels[i])
    return xs, ys


_canonical = td.canonical_images


def canonical_aligned(task):
    if task != "digits":
        return _canonical(task)
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(12345).permutation(len(d.target))
    pool = order[: int(0.6 * len(order))]
    out = []
    for c in range(10):
        idx = [i for i in pool if d.target[i] == c][:4]
        vs = [np.repeat(np.kron(d.images[i].astype(np.float32) / 16, np.ones((SCALE, SCALE), np.float32))[None], 3, 0)
              for i in idx]
        out.append(np.stack(vs))
    return np.stack(out).astype(np.float32)


td._GENERATORS["digits"] = draw_digits_aligned
td.canonical_images = canonical_aligned
tb.canonical_images = canonical_aligned
td.GENERATOR_VERSION = 1000 + td.GENERATOR_VERSION

pre_seed, out = sys.argv[1], sys.argv[2]
here = Path(__file__).parent
sys.argv = [str(here / "head_lever.py"), pre_seed, "{}", "{}", out]
runpy.run_path(str(here / "head_lever.py"), run_name="__main__")
