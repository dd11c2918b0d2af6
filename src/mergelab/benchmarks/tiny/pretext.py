"""The ``tiny`` benchmark's pretext pool: scenes of random objects on plain or patterned backgrounds,
labelled only with their own generator's factors (which object, which pattern, 17 continuous attributes, the
strokes of a glyph), none of them a label of the eight tasks. The encoder is pretrained on them
(:func:`mergelab.training.pretrain.pretrain_factors`); the tasks themselves are in :mod:`.data`, whose drawing
primitives and cache this module shares.
"""

from __future__ import annotations

import math

import numpy as np

from .data import (IMAGE_SIZE, _XX, _YY, TinyDataConfig, _background, _cache_path, _cached_arrays, _distractors, _finish,
                   _hsv)

PRETEXT_KINDS: tuple[str, ...] = ("blob", "polygon", "star", "ellipse", "annulus", "plus", "bar", "glyph")
"""Object generators of the pretext scenes (the ``kind`` label: a partition unlike any task's classes;
a task's circle is an ellipse of aspect 1 or a blob without lobes, its square a 4-gon)."""
PRETEXT_TEXTURES: tuple[str, ...] = ("plain", "stripes", "grid", "dots")
"""Background patterns of the pretext scenes (at any angle and period, unlike the task's six)."""
PRETEXT_REGRESSION: tuple[str, ...] = (
    "count", "x", "y", "log_radius", "hue_cos", "hue_sin", "value", "elongation_cos2", "elongation_sin2",
    "vertices", "hole", "texture_cos2", "texture_sin2", "texture_period", "background_hue_cos",
    "background_hue_sin", "background_value")
"""Continuous attributes of each pretext scene, regressed in pretraining (NaN where undefined: the
largest object's attributes in a scene without objects). ``count``: objects in the scene (0..5);
``x``, ``y``: the largest object's centre in ``[-1, 1]``; ``log_radius`` its size; ``hue_*`` its hue on
the circle; ``elongation_*``: ``e cos 2t, e sin 2t`` of its long axis ``t`` and elongation ``e`` (bars 1,
ellipses ``1 - 1/aspect``, others 0); ``vertices``: corners (polygons ``k``, stars ``2k``, plus 12, else
0); ``hole``: 1 for an annulus; ``texture_*``: the background pattern's angle and period (0 if plain)."""
PRETEXT_STROKES = 20
"""Glyph strokes: the 12 edges and 8 cell diagonals of a 3x3 lattice; a glyph object draws 2-6 of
them, and the largest object's stroke set is a multi-label target (zeros when it is not a glyph)."""

# glyph strokes: the 12 edges and 8 cell diagonals of a 3x3 lattice of points
_LAT = [(i, j) for i in range(3) for j in range(3)]
SEGMENTS = ([((r, c), (r, c + 1)) for r in range(3) for c in range(2)] + [((r, c), (r + 1, c)) for r in range(2) for c in range(3)]
            + [((r, c), (r + 1, c + 1)) for r in range(2) for c in range(2)] + [((r, c + 1), (r + 1, c)) for r in range(2) for c in range(2)])


def _seg_dist(x0, y0, x1, y1):
    px, py = _XX - x0, _YY - y0
    dx, dy = x1 - x0, y1 - y0
    L2 = dx * dx + dy * dy + 1e-9
    t = np.clip((px * dx + py * dy) / L2, 0, 1)
    return np.hypot(px - t * dx, py - t * dy)


def _polygon_mask(cx, cy, r, k, rot):
    ang = np.arctan2(_YY - cy, _XX - cx) - rot
    d = np.hypot(_XX - cx, _YY - cy)
    sector = 2 * math.pi / k
    a = np.mod(ang, sector) - sector / 2
    return d * np.cos(a) <= r * math.cos(math.pi / k)


def _texture(rng, kind):
    """A full-image pattern mask and its (angle, period)."""
    period = rng.uniform(3.0, 7.0)
    angle = rng.uniform(0, math.pi)
    phase = rng.uniform(0, period)
    u = math.cos(angle) * _XX + math.sin(angle) * _YY
    v = -math.sin(angle) * _XX + math.cos(angle) * _YY
    if kind == "stripes":
        mask = ((u + phase) % period) < period / 2
    elif kind == "grid":
        mask = (((u + phase) % period) < period / 3) | (((v + phase) % period) < period / 3)
    else:  # dots on a rotated lattice
        fu, fv = (u + phase) % period - period / 2, (v + phase) % period - period / 2
        mask = fu**2 + fv**2 <= (period / 3.2) ** 2
    return mask, angle, period


def _draw_object(rng, img, kind, cx, cy, r, colour):
    """Paint one object; return (elongation-weighted cos 2t, sin 2t, n_vertices, hole, strokes)."""
    strokes = np.zeros(PRETEXT_STROKES, np.float32)
    c2 = s2 = 0.0
    nv, hole = 0.0, 0.0
    if kind == "blob":
        amp, k, phi = rng.uniform(0, 0.5), rng.integers(2, 7), rng.uniform(0, 6.3)
        theta = np.arctan2(_YY - cy, _XX - cx)
        mask = (_XX - cx) ** 2 + (_YY - cy) ** 2 <= (r * (1 + amp * np.sin(k * theta + phi))) ** 2
    elif kind == "polygon":
        k = int(rng.integers(3, 8)); nv = k
        mask = _polygon_mask(cx, cy, r, k, rng.uniform(0, 2 * math.pi))
    elif kind == "star":
        k = int(rng.integers(4, 7)); nv = 2 * k
        theta = np.arctan2(_YY - cy, _XX - cx) - rng.uniform(0, 6.3)
        inner = rng.uniform(0.4, 0.6)
        rr = r * (inner + (1 - inner) * np.abs(np.cos(k * theta / 2)) ** 3)
        mask = np.hypot(_XX - cx, _YY - cy) <= rr
    elif kind == "ellipse":
        aspect, t = rng.uniform(1.0, 3.0), rng.uniform(0, math.pi)
        u = math.cos(t) * (_XX - cx) + math.sin(t) * (_YY - cy)
        v = -math.sin(t) * (_XX - cx) + math.cos(t) * (_YY - cy)
        mask = (u / r) ** 2 + (v * aspect / r) ** 2 <= 1
        e = 1 - 1 / aspect
        c2, s2 = e * math.cos(2 * t), e * math.sin(2 * t)
    elif kind == "annulus":
        d2 = (_XX - cx) ** 2 + (_YY - cy) ** 2
        mask = (d2 <= r**2) & (d2 >= (rng.uniform(0.4, 0.75) * r) ** 2)
        hole = 1.0
    elif kind == "plus":
        t = rng.uniform(0, math.pi / 2)
        arm = max(r * rng.uniform(0.2, 0.4), 1.0)
        u = math.cos(t) * (_XX - cx) + math.sin(t) * (_YY - cy)
        v = -math.sin(t) * (_XX - cx) + math.cos(t) * (_YY - cy)
        mask = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
        nv = 12
    elif kind == "bar":
        t = rng.uniform(0, math.pi)
        w = rng.uniform(0.8, 2.0)
        u = math.cos(t) * (_XX - cx) - math.sin(t) * (_YY - cy)
        v = math.sin(t) * (_XX - cx) + math.cos(t) * (_YY - cy)
        mask = (np.abs(u) <= r) & (np.abs(v) <= w)
        # the bar's direction in image coordinates is (cos t, -sin t)
        c2, s2 = math.cos(2 * t), -math.sin(2 * t)
    else:  # glyph
        n_on = int(rng.integers(2, 7))
        on = rng.choice(PRETEXT_STROKES, n_on, replace=False)
        strokes[on] = 1
        h, w = 2 * r, 2 * r * rng.uniform(0.55, 0.8)
        width = rng.uniform(1.0, 2.0)
        dist = np.full(_XX.shape, np.inf, np.float32)
        pt = lambda p: (cx - w / 2 + p[1] * w / 2, cy - h / 2 + p[0] * h / 2)
        for i in on:
            (a, b) = SEGMENTS[i]
            x0, y0 = pt(a); x1, y1 = pt(b)
            dist = np.minimum(dist, _seg_dist(x0, y0, x1, y1))
        mask = dist <= width
    img[mask] = colour
    return c2, s2, nv, hole, strokes


def _draw_pretext(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pretext scenes: a plain or patterned background and 0-5 objects of the :data:`PRETEXT_KINDS`.

    Returns images ``(n, 3, 32, 32)`` and targets: ``kind`` ``(n,)`` int64 (the largest object's
    generator, -100 without objects), ``texture`` ``(n,)`` int64, ``regression``
    ``(n, len(PRETEXT_REGRESSION))`` float32 (NaN where undefined), ``strokes`` ``(n, PRETEXT_STROKES)``
    float32 (NaN without objects).
    """
    xs, kinds, textures, regression, strokes_all = [], [], [], [], []
    nan = float("nan")
    for _ in range(n):
        img = _background(rng)
        bg = img.mean(axis=(0, 1))
        tex = PRETEXT_TEXTURES[rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])]
        tc = ts = tp = 0.0
        if tex != "plain":
            mask, ang, per = _texture(rng, tex)
            img[mask] = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.5, 1.0))
            tc, ts, tp = math.cos(2 * ang), math.sin(2 * ang), per
        count = int(rng.integers(0, 6)) if tex == "plain" else int(rng.integers(0, 3))
        objs = []
        for _ in range(count):
            kind = PRETEXT_KINDS[rng.integers(len(PRETEXT_KINDS))]
            r = math.exp(rng.uniform(math.log(2.0), math.log(12.0))) if count <= 2 else rng.uniform(2.0, 5.0)
            cx, cy = rng.uniform(r * 0.6, IMAGE_SIZE - r * 0.6, size=2)
            hue = rng.random()
            sat = rng.uniform(0.0, 1.0) if rng.random() < 0.2 else rng.uniform(0.5, 1.0)
            colour = _hsv(hue, sat, rng.uniform(0.4, 1.0))
            objs.append((r, kind, cx, cy, hue, float(colour.max()), _draw_object(rng, img, kind, cx, cy, r, colour)))
        bh = _rgb_hue(bg)
        row = [float(count)]
        if objs:
            r, kind, cx, cy, hue, val, (c2, s2, nv, hole, strokes) = max(objs, key=lambda o: o[0])
            kinds.append(PRETEXT_KINDS.index(kind))
            row += [cx / 16 - 1, cy / 16 - 1, math.log(r), math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue),
                    val, c2, s2, nv, hole]
            strokes_all.append(strokes)
        else:
            kinds.append(-100)
            row += [nan] * 10
            strokes_all.append(np.full(PRETEXT_STROKES, nan, np.float32))
        row += [tc, ts, tp, math.cos(2 * math.pi * bh), math.sin(2 * math.pi * bh), float(bg.max())]
        regression.append(row)
        textures.append(PRETEXT_TEXTURES.index(tex))
        _distractors(img, rng, n_max=2)
        xs.append(_finish(img, rng, noise))
    targets = {"kind": np.asarray(kinds, np.int64), "texture": np.asarray(textures, np.int64),
               "regression": np.asarray(regression, np.float32), "strokes": np.stack(strokes_all).astype(np.float32)}
    return np.stack(xs).astype(np.float32), targets


def _rgb_hue(rgb):
    import colorsys
    return colorsys.rgb_to_hsv(*np.clip(rgb, 0, 1))[0]


def load_pretext(cfg: TinyDataConfig | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The pretext pool: images ``(n_pretext, 3, 32, 32)`` float32 and their generator targets (see
    :func:`_draw_pretext`: ``kind``, ``texture``, ``regression``, ``strokes``), cached like the tasks.
    None of the targets is a label of the eight tasks."""
    cfg = cfg or TinyDataConfig()
    def draw() -> dict[str, np.ndarray]:
        X, targets = _draw_pretext(np.random.default_rng([cfg.seed, 999]), cfg.n_pretext, cfg.noise)
        return {"X": X, **targets}

    arrays = _cached_arrays(_cache_path("pretext", cfg), draw)
    return arrays["X"], {k: arrays[k] for k in ("kind", "texture", "regression", "strokes")}
