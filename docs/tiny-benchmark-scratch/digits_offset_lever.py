"""Session 11 of the tiny-benchmark design (issue 16): the digits task as it was before generator version 6, for
more pretraining draws of the comparison with the aligned glyph (the package since session 11).

It restores, in this process, the digits generator of version 5 (scikit-learn's 8x8 digit upscaled 3x to 24x24 at a
random offset of 0-8 pixels) and its canonical heads (the 24x24 glyph centred), moves `GENERATOR_VERSION` so every key
that depends on the data differs from the package's, and runs `head_lever.py` (chapter 00's seed study at one
pretraining seed, pretraining on that data).

usage: MERGELAB_DATA_DIR=<empty dir> MERGELAB_PRETRAIN=1 python docs/tiny-benchmark-scratch/digits_offset_lever.py PRETRAIN_SEED OUT.json
"""
import runpy
import sys
from pathlib import Path

import numpy as np

from mergelab.benchmarks.tiny import benchmark as tb, data as td


def draw_digits_offset(rng, n, noise, split_index):
    images, labels, pools = td._digit_pools()  # the package's disjoint base digits per split
    images, pool = images.astype(np.float32) / 16.0, pools[split_index]
    xs, ys = [], []
    for _ in range(n):
        i = pool[rng.integers(len(pool))]
        glyph = np.kron(images[i], np.ones((3, 3), np.float32))
        img = td._plain(rng, None, (0.0, 0.3), (0.0, 0.15))
        size = glyph.shape[0]
        oy, ox = rng.integers(0, td.IMAGE_SIZE - size + 1, size=2)
        colour = td._hsv(td._object_hue(rng, "digits"), rng.uniform(0.3, 1.0), rng.uniform(0.85, 1.0))
        region = img[oy:oy + size, ox:ox + size]
        img[oy:oy + size, ox:ox + size] = region * (1 - glyph[..., None]) + colour * glyph[..., None]
        xs.append(td._finish(img, rng, noise))
        ys.append(labels[i])
    return xs, ys


_canonical = td.canonical_images


def canonical_offset(task):
    if task != "digits":
        return _canonical(task)
    images, labels, (train, _, _) = td._digit_pools()
    out = []
    for c in range(10):
        vs = []
        for i in [i for i in train if labels[i] == c][:4]:
            img = np.zeros((3, 32, 32), np.float32)
            img[:, 4:28, 4:28] = np.kron(images[i].astype(np.float32) / 16, np.ones((3, 3), np.float32))[None]
            vs.append(img)
        out.append(np.stack(vs))
    return np.stack(out).astype(np.float32)


td._GENERATORS["digits"] = draw_digits_offset
td.canonical_images = canonical_offset
tb.canonical_images = canonical_offset
td.GENERATOR_VERSION = 2000 + td.GENERATOR_VERSION

pre_seed, out = sys.argv[1], sys.argv[2]
here = Path(__file__).parent
sys.argv = [str(here / "head_lever.py"), pre_seed, "{}", "{}", out]
runpy.run_path(str(here / "head_lever.py"), run_name="__main__")
