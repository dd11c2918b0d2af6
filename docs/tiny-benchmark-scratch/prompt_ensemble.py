"""Session 6 lever (issue 16): canonical heads as a *prompt ensemble*, on two pretraining draws.

CLIP's zero-shot heads average a class name over many prompt templates ("a photo of a red object",
"a drawing of a red object", ...), so what the templates vary cancels and what names the class stays.
The package's canonical heads render each class once (a white or coloured object, centred, on black;
digits: four glyphs), so every prototype of a task shares a large "object on black" component. This
lever renders each class ``V = 8`` times, each variant clean (no noise, no distractors) but with its own
background grey level, object colour or contrast, position and size jitter (never the factor that is
the class), and averages the normalized features as the package does. It never looks at the tasks'
images. The package's ``canonical_images`` is replaced for this process only; everything else is
`head_lever.py` (chapter 00's seed study, three fine-tuning seeds, test split).

usage: MERGELAB_DATA_DIR=... python docs/tiny-benchmark-scratch/prompt_ensemble.py PRETRAIN_SEED OUT.json
"""
import math
import runpy
import sys

import numpy as np

from mergelab.benchmarks.tiny import benchmark as tb
from mergelab.benchmarks.tiny import data as td

V = 8


def ensemble_images(task: str) -> np.ndarray:
    """``(C, V, 3, 32, 32)`` in ``[0, 1]``: ``V`` clean renderings of each class of ``task``."""
    C = len(td.TASK_CLASSES[task])
    rng = np.random.default_rng(2026)
    backgrounds = [0.0, 0.9, 0.15, 0.75, 0.3, 0.6, 0.05, 0.45]
    out = []
    for c in range(C):
        vs = []
        for v in range(V):
            b = backgrounds[v]
            img = np.full((32, 32, 3), b, np.float32)
            hue = rng.random()
            # an object colour that stands out from the background: a saturated hue or white/black
            obj = td._hsv(hue, 0.8, 1.0) if v % 2 else np.full(3, 0.0 if b > 0.5 else 1.0, np.float32)
            dx, dy = rng.uniform(-3, 3, size=2)
            scale = rng.uniform(0.85, 1.15)
            kind = td._SHAPES[rng.integers(len(td._SHAPES))]
            if task == "digits":
                from sklearn.datasets import load_digits
                d = load_digits()
                order = np.random.default_rng(12345).permutation(len(d.target))
                pool = order[: int(0.6 * len(order))]
                idx = [i for i in pool if d.target[i] == c]
                g = np.kron(d.images[idx[v % len(idx)]].astype(np.float32) / 16, np.ones((3, 3), np.float32))
                oy, ox = 4 + int(round(dy)), 4 + int(round(dx))
                oy, ox = min(max(oy, 0), 8), min(max(ox, 0), 8)
                region = img[oy:oy + 24, ox:ox + 24]
                img[oy:oy + 24, ox:ox + 24] = region * (1 - g[..., None]) + obj * g[..., None]
            elif task == "shapes":
                img[td._shape_mask(td._SHAPES[c], 16 + dx, 16 + dy, 7.5 * scale)] = obj
            elif task == "colours":
                img[td._shape_mask(kind, 16 + dx, 16 + dy, 7.5 * scale)] = td._hsv(c / C, 1.0, 1.0)
            elif task == "counting":
                r = 2.5 * scale
                pts = [(16.0, 16.0)] if c == 0 else [(16 + 8 * math.cos(2 * math.pi * j / (c + 1) + v),
                                                       16 + 8 * math.sin(2 * math.pi * j / (c + 1) + v)) for j in range(c + 1)]
                for (x, y) in pts:
                    img[td._shape_mask(kind, x + dx / 3, y + dy / 3, r)] = obj
            elif task == "position":
                row, col = divmod(c, 3)
                img[td._shape_mask(kind, (col + 0.5) * 32 / 3 + dx / 2, (row + 0.5) * 32 / 3 + dy / 2, 3.75 * scale)] = obj
            elif task == "textures":
                img[td.canonical_texture_mask(c, 4.5 * scale, dx, dy)] = obj
            elif task == "orientation":
                a = math.radians(45 * c)
                along = math.cos(a) * (td._XX - 16 - dx) - math.sin(a) * (td._YY - 16 - dy)
                across = math.sin(a) * (td._XX - 16 - dx) + math.cos(a) * (td._YY - 16 - dy)
                img[(np.abs(along) <= 9 * scale) & (np.abs(across) <= 1.5)] = obj
            elif task == "size":
                img[td._shape_mask(kind, 16 + dx, 16 + dy, (3.0, 6.25, 11.0)[c])] = obj
            vs.append(img.transpose(2, 0, 1))
        out.append(np.stack(vs))
    return np.clip(np.stack(out), 0, 1).astype(np.float32)


tb.canonical_images = ensemble_images
sys.argv = ["head_lever.py", sys.argv[1], "{}", "{}", sys.argv[2]]
runpy.run_path("docs/tiny-benchmark-scratch/head_lever.py", run_name="__main__")
