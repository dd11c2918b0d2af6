"""The ``tiny`` benchmark's data: 8 image-classification tasks generated offline from a seed.

Every image is ``(3, 32, 32)`` float32 in ``[0, 1]``. Tasks share one image family (objects on a noisy
background) but ask for different features (identity, shape, colour, count, position, texture,
orientation, size), so that experts fine-tuned on them interfere when merged. The pretext pool the encoder
is pretrained on, labelled only with its own generator's factors, is in :mod:`.pretext`.

Generation is deterministic: the same ``seed`` and sizes give byte-identical arrays, cached in
``data/tiny/`` as ``.npz`` keyed by a hash of the generator's configuration.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ... import codeversion, paths
from ...cache import build_lock
from ...utils import atomic_save_npz, check_integer, check_number, config_hash, read_npz

IMAGE_SIZE = 32
GENERATOR_VERSION = 6  # bump when any generator below changes, so caches are rebuilt (6: digits aligned with the patch grid)

TASK_CLASSES: dict[str, list[str]] = {
    "digits": [str(d) for d in range(10)],
    "shapes": ["circle", "square", "triangle", "cross", "ring"],
    "colours": ["red", "yellow", "green", "cyan", "blue", "magenta"],
    "counting": ["one", "two", "three", "four", "five"],
    "position": [f"{r}-{c}" for r in ("top", "middle", "bottom") for c in ("left", "centre", "right")],
    "textures": ["horizontal", "vertical", "diagonal", "anti-diagonal", "checkerboard", "dots"],
    "orientation": ["0 deg", "45 deg", "90 deg", "135 deg"],
    "size": ["small", "medium", "large"],
}
TASKS: tuple[str, ...] = tuple(TASK_CLASSES)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TinyDataConfig:
    """Sizes and seed of the generated benchmark.

    Attributes:
        seed: master seed; each task and split derives its own stream from it.
        n_train, n_val, n_test: images per task and split.
        n_pretext: images in the unlabeled pretext pool used for pretraining.
        noise: standard deviation of the per-pixel Gaussian noise, in intensity units (0..1).
    """

    seed: int = 0
    n_train: int = 2000
    n_val: int = 400
    n_test: int = 1000
    n_pretext: int = 20000
    noise: float = 0.08

    def __post_init__(self) -> None:
        check_integer("seed", self.seed, minimum=0)
        for name in ("n_train", "n_val", "n_test", "n_pretext"):
            check_integer(name, getattr(self, name))
        check_number("noise", self.noise, low=0, high=1, high_open=True)


def check_task(task: str) -> str:
    """Return ``task`` if it is a tiny task, else raise an error that lists the valid ones."""
    if task not in TASK_CLASSES:
        raise ValueError(f"task={task!r} is not a tiny task; valid: {', '.join(TASKS)}.")
    return task


# ----------------------------------------------------------------------------- drawing primitives
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _plain(rng: np.random.Generator, hue: float | None, sat: tuple[float, float],
           val: tuple[float, float]) -> np.ndarray:
    """A domain's background: a colour drawn around ``hue`` (random when ``None``) with a soft gradient."""
    h = rng.random() if hue is None else hue + rng.uniform(-0.04, 0.04)
    base = _hsv(h, rng.uniform(*sat), rng.uniform(*val))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * _XX + np.sin(angle) * _YY) / IMAGE_SIZE
    return (base[None, None, :] + 0.08 * (ramp - ramp.mean())[..., None]).astype(np.float32)


# Each task is its own visual domain, as each of the 8 public datasets is: a background style and an
# object palette of its own. (With one shared image family, experts fight over identical inputs and
# no merge beats zero-shot.)
_DOMAINS = {
    "shapes": dict(bg=(None, (0.0, 0.05), (0.65, 0.85)), grey_objects=True),
    "colours": dict(bg=(None, (0.0, 0.05), (0.9, 1.0)), grey_objects=False),
    "position": dict(bg=(0.62, (0.5, 0.8), (0.25, 0.45)), grey_objects=False),
    "size": dict(bg=(0.08, (0.5, 0.8), (0.3, 0.5)), grey_objects=False),
}


OBJECT_HUES: dict[str, float] = {}
"""Per task, the centre of a narrow hue band (width .08) its objects are drawn from; a task not listed
draws its objects' hue uniformly. Empty: every task draws any hue (the package). Set it in the process
that generates the data (worker processes do not inherit it); when set it enters every key that depends on
the data (:func:`generator_key`)."""


def generator_key() -> dict[str, Any]:
    """What the generated images depend on besides a :class:`TinyDataConfig`: the generators' version, the
    code version of kind ``data`` (:mod:`mergelab.codeversion`, whose test flags any change to this module and
    :mod:`.pretext`) and, when set, :data:`OBJECT_HUES` (part of the data caches', the encoder's and the
    benchmark's keys, so that new images rebuild all three)."""
    hues = {"object_hues": sorted(OBJECT_HUES.items())} if OBJECT_HUES else {}
    code = {f"data_{k}": v for k, v in codeversion.key_part("data").items()}  # nothing at version 1
    return {"generator_version": GENERATOR_VERSION, **hues, **code}


def _object_hue(rng: np.random.Generator, task: str) -> float:
    """A hue in ``[0, 1)`` for one of ``task``'s objects (one uniform draw whatever the palette)."""
    u = rng.random()
    centre = OBJECT_HUES.get(task)
    return u if centre is None else (centre + 0.08 * (u - 0.5)) % 1.0


def _random_colour(rng: np.random.Generator, task: str) -> np.ndarray:
    return _hsv(_object_hue(rng, task), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))


def _background(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background with a soft gradient, ``(32, 32, 3)``."""
    base = _hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.05, 0.45))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * _XX + np.sin(angle) * _YY) / IMAGE_SIZE
    img = base[None, None, :] + 0.15 * (ramp - ramp.mean())[..., None]
    return img.astype(np.float32)


def _shape_mask(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        side = r * 0.85
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    if kind == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if kind == "cross":
        arm = max(r / 3.0, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    img[mask] = colour


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).transpose(2, 0, 1).copy()


def _distractors(img: np.ndarray, rng: np.random.Generator, n_max: int = 2) -> None:
    """Faint random strokes: clutter that every task must ignore."""
    for _ in range(rng.integers(0, n_max + 1)):
        angle = rng.uniform(0, math.pi)
        cx, cy = rng.uniform(0, IMAGE_SIZE, size=2)
        dist = np.abs(np.cos(angle) * (_YY - cy) - np.sin(angle) * (_XX - cx))
        colour = img.mean(axis=(0, 1)) + rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
        img[dist <= 0.6] = colour


# ----------------------------------------------------------------------------- one generator per task
_SHAPES = TASK_CLASSES["shapes"]


DIGIT_SCALE = IMAGE_SIZE // 8
"""Each of scikit-learn's 8x8 digit pixels becomes a 4x4 block: the glyph fills the image, and every 8-pixel
patch of the encoder holds exactly 2x2 of the digit's pixels. MNIST in the public benchmark is centred and
upscaled 8x the same way, so a patch always sees the same part of a digit (docs/tiny-benchmark.md, session
11: the glyph 3x at a random offset of 0-8 pixels cut it at 64 phases, and the digits expert reached .37)."""


def _digit_glyph(image: np.ndarray) -> np.ndarray:
    """``(32, 32)`` ink in ``[0, 1]`` of one of scikit-learn's ``(8, 8)`` digits (values 0..16)."""
    return np.kron(image.astype(np.float32) / 16.0, np.ones((DIGIT_SCALE, DIGIT_SCALE), np.float32))


def _digit_pools() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits: images ``(1797, 8, 8)`` (values 0..16), labels ``(1797,)``, and the indices of the
    base digits of each split (train, val, test: 60/15/25 %, disjoint, so test digits were never seen in training)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(12345).permutation(len(digits.target))
    cut1, cut2 = int(0.6 * len(order)), int(0.75 * len(order))
    return digits.images, digits.target, (order[:cut1], order[cut1:cut2], order[cut2:])


def _draw_digits(rng, n, noise, split_index):
    images, labels, pools = _digit_pools()
    pool = pools[split_index]
    xs, ys = [], []
    for _ in range(n):
        i = pool[rng.integers(len(pool))]
        glyph = _digit_glyph(images[i])[..., None]
        img = _plain(rng, None, (0.0, 0.3), (0.0, 0.15))
        colour = _hsv(_object_hue(rng, "digits"), rng.uniform(0.3, 1.0), rng.uniform(0.85, 1.0))
        img = img * (1 - glyph) + colour * glyph
        xs.append(_finish(img, rng, noise))
        ys.append(labels[i])
    return xs, ys


def _draw_object_task(task):
    def draw(rng, n, noise, split_index):
        xs, ys = [], []
        n_classes = len(TASK_CLASSES[task])
        for _ in range(n):
            y = int(rng.integers(n_classes))
            domain = _DOMAINS[task]
            img = _plain(rng, *domain["bg"])
            kind = _SHAPES[rng.integers(len(_SHAPES))]
            r = rng.uniform(5.0, 10.0)
            colour = _hsv(0, 0, rng.uniform(0.0, 0.35)) if domain["grey_objects"] else _random_colour(rng, task)
            cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
            if task == "shapes":
                kind = _SHAPES[y]
            elif task == "colours":
                hue = y / n_classes + rng.uniform(-0.04, 0.04)
                colour = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
            elif task == "position":
                row, col = divmod(y, 3)
                cell = IMAGE_SIZE / 3
                r = rng.uniform(3.0, 4.5)
                cx = (col + rng.uniform(0.3, 0.7)) * cell
                cy = (row + rng.uniform(0.3, 0.7)) * cell
            elif task == "size":
                r = (rng.uniform(2.5, 3.5), rng.uniform(5.5, 7.0), rng.uniform(10.0, 12.0))[y]
                cx, cy = rng.uniform(r, IMAGE_SIZE - r, size=2)
            _paint(img, _shape_mask(kind, cx, cy, r), colour)
            _distractors(img, rng)
            xs.append(_finish(img, rng, noise))
            ys.append(y)
        return xs, ys

    return draw


def _draw_counting(rng, n, noise, split_index):
    xs, ys = [], []
    for _ in range(n):
        y = int(rng.integers(5))
        img = _plain(rng, None, (0.0, 0.1), (0.0, 0.08))
        centres: list[tuple[float, float]] = []
        while len(centres) < y + 1:
            c = tuple(rng.uniform(4, IMAGE_SIZE - 4, size=2))
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 49 for a, b in centres):
                centres.append(c)
        for cx, cy in centres:
            kind = ("circle", "square")[rng.integers(2)]
            _paint(img, _shape_mask(kind, cx, cy, rng.uniform(2.0, 3.0)), _random_colour(rng, "counting"))
        _distractors(img, rng, n_max=1)
        xs.append(_finish(img, rng, noise))
        ys.append(y)
    return xs, ys


def _draw_textures(rng, n, noise, split_index):
    xs, ys = [], []
    for _ in range(n):
        y = int(rng.integers(6))
        period = rng.uniform(3.0, 6.0)
        phase = rng.uniform(0, period)
        a, b = _random_colour(rng, "textures"), _background(rng)[0, 0]
        u = {0: _YY, 1: _XX, 2: _XX + _YY, 3: _XX - _YY}.get(y)
        if u is not None:
            step = period * (math.sqrt(2) if y >= 2 else 1.0)
            mask = ((u + phase) % step) < step / 2
        elif y == 4:
            mask = (((_XX + phase) // (period / 1.4)) + ((_YY + phase) // (period / 1.4))) % 2 == 0
        else:
            fx, fy = (_XX + phase) % period - period / 2, (_YY + phase) % period - period / 2
            mask = fx**2 + fy**2 <= (period / 3.5) ** 2
        img = np.where(mask[..., None], a[None, None], b[None, None]).astype(np.float32)
        xs.append(_finish(img, rng, noise))
        ys.append(y)
    return xs, ys


def _draw_orientation(rng, n, noise, split_index):
    xs, ys = [], []
    for _ in range(n):
        y = int(rng.integers(4))
        angle = math.radians(45 * y + rng.uniform(-8, 8))
        img = _plain(rng, 0.33, (0.4, 0.7), (0.25, 0.45))
        cx, cy = rng.uniform(10, 22, size=2)
        half, width = rng.uniform(6, 12), rng.uniform(1.0, 2.0)
        along = math.cos(angle) * (_XX - cx) - math.sin(angle) * (_YY - cy)
        across = math.sin(angle) * (_XX - cx) + math.cos(angle) * (_YY - cy)
        _paint(img, (np.abs(along) <= half) & (np.abs(across) <= width), _random_colour(rng, "orientation"))
        _distractors(img, rng, n_max=1)
        xs.append(_finish(img, rng, noise))
        ys.append(y)
    return xs, ys


_GENERATORS = {
    "digits": _draw_digits,
    "shapes": _draw_object_task("shapes"),
    "colours": _draw_object_task("colours"),
    "counting": _draw_counting,
    "position": _draw_object_task("position"),
    "textures": _draw_textures,
    "orientation": _draw_orientation,
    "size": _draw_object_task("size"),
}


# ----------------------------------------------------------------------------- canonical class renderings
def canonical_texture_mask(c: int, period: float = 4.5, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """``(32, 32)`` boolean mask of texture class ``c`` (stripes: horizontal, vertical, diagonal,
    anti-diagonal; checkerboard; dots) with ``period`` pixels, shifted by ``(dx, dy)`` pixels."""
    xx, yy = _XX + dx, _YY + dy
    u = {0: yy, 1: xx, 2: xx + yy, 3: xx - yy}.get(c)
    if u is not None:
        step = period * (math.sqrt(2) if c >= 2 else 1.0)
        return (u % step) < step / 2
    if c == 4:
        return ((xx // (period / 1.4)) + (yy // (period / 1.4))) % 2 == 0
    fx, fy = xx % period - period / 2, yy % period - period / 2
    return fx**2 + fy**2 <= (period / 3.5) ** 2


def canonical_images(task: str) -> np.ndarray:
    """(C, V, 3, 32, 32) clean exemplars of each class: white (or the class colour) on black, centred, no noise."""
    C = len(TASK_CLASSES[task])
    out = []
    white = np.ones(3, np.float32)
    digits = _digit_pools() if task == "digits" else None
    for c in range(C):
        vs = []
        if digits is not None:  # four base digits of the training pool per class
            images, labels, (train, _, _) = digits
            for i in [i for i in train if labels[i] == c][:4]:  # white ink on black, laid out as the task draws it
                vs.append(np.repeat(_digit_glyph(images[i])[..., None], 3, axis=2))
        else:
            img = np.zeros((32, 32, 3), np.float32)
            if task == "shapes":
                img[_shape_mask(_SHAPES[c], 16, 16, 7.5)] = white
            elif task == "colours":
                img[_shape_mask("circle", 16, 16, 7.5)] = _hsv(c / C, 1.0, 1.0)
            elif task == "counting":
                pts = [(16, 16)] if c == 0 else [(16 + 8 * math.cos(2 * math.pi * j / (c + 1)), 16 + 8 * math.sin(2 * math.pi * j / (c + 1))) for j in range(c + 1)]
                for (x, y) in pts:
                    img[_shape_mask("circle", x, y, 2.5)] = white
            elif task == "position":
                row, col = divmod(c, 3)
                img[_shape_mask("circle", (col + 0.5) * 32 / 3, (row + 0.5) * 32 / 3, 3.75)] = white
            elif task == "textures":
                img[canonical_texture_mask(c)] = white
            elif task == "orientation":
                a = math.radians(45 * c)
                along = math.cos(a) * (_XX - 16) - math.sin(a) * (_YY - 16)
                across = math.sin(a) * (_XX - 16) + math.cos(a) * (_YY - 16)
                img[(np.abs(along) <= 9) & (np.abs(across) <= 1.5)] = white
            elif task == "size":
                img[_shape_mask("circle", 16, 16, (3.0, 6.25, 11.0)[c])] = white
            vs.append(img)
        out.append(np.stack([v.transpose(2, 0, 1) for v in vs]))
    V = min(len(v) for v in out)
    return np.stack([v[:V] for v in out]).astype(np.float32)


# ----------------------------------------------------------------------------- public API
def _cache_path(kind: str, cfg: TinyDataConfig) -> Path:
    generator = generator_key()
    key = config_hash({"kind": kind, "version": generator.pop("generator_version"), **generator, **asdict(cfg)})
    return paths.data_dir() / "tiny" / f"{kind}-{key}.npz"


def _cached_arrays(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays saved in ``path`` (``.npz``), made by ``make`` and saved atomically the first time, under
    :func:`mergelab.cache.build_lock`, so processes side by side (a report's chapters) generate them once.
    Saved uncompressed: every kernel and worker of a report reads every task (compressed, 2 CPU s each time
    for the `tiny` size's 24 files instead of .15, and 13 s to write them); a compressed file of an
    earlier version is read as well."""
    arrays = read_npz(path)  # missing or damaged: made again
    if arrays is None:
        with build_lock(path):
            arrays = read_npz(path, warn=False)  # another process may have made it meanwhile (warned once above)
            if arrays is None:
                arrays = make()
                atomic_save_npz(path, compress=False, **arrays)
    return arrays


def generate_task(task: str, split: str, cfg: TinyDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Generate one task's split without caching.

    Returns:
        ``X``: ``(n, 3, 32, 32)`` float32 in ``[0, 1]``; ``y``: ``(n,)`` int64 class indices.
    """
    check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; use one of {', '.join(SPLITS)}.")
    split_index = SPLITS.index(split)
    n = (cfg.n_train, cfg.n_val, cfg.n_test)[split_index]
    rng = np.random.default_rng([cfg.seed, TASKS.index(task), split_index])
    xs, ys = _GENERATORS[task](rng, n, cfg.noise, split_index)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def load_task(task: str, split: str, cfg: TinyDataConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One task's split, generated once and cached in ``data/tiny`` (see :func:`generate_task`)."""
    cfg = cfg or TinyDataConfig()
    check_task(task)
    arrays = _cached_arrays(_cache_path(f"{task}-{split}", cfg),
                            lambda: dict(zip(("X", "y"), generate_task(task, split, cfg))))
    return arrays["X"], arrays["y"]
