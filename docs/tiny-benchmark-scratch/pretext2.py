"""Scratch: factor-covering pretext scenes and canonical class renderings (to move into tinydata)."""
import math
import numpy as np
from mergelab.tinydata import (IMAGE_SIZE, _XX, _YY, _hsv, _finish, _distractors, _background, _shape_mask,
                               TASK_CLASSES)

KINDS = ("blob", "polygon", "star", "ellipse", "annulus", "plus", "bar", "glyph")
TEXTURES = ("plain", "stripes", "grid", "dots")
# glyph strokes: the 12 edges and 8 cell diagonals of a 3x3 lattice of points
_LAT = [(i, j) for i in range(3) for j in range(3)]
SEGMENTS = ([((r, c), (r, c + 1)) for r in range(3) for c in range(2)] + [((r, c), (r + 1, c)) for r in range(2) for c in range(3)]
            + [((r, c), (r + 1, c + 1)) for r in range(2) for c in range(2)] + [((r, c + 1), (r + 1, c)) for r in range(2) for c in range(2)])
N_SEG = len(SEGMENTS)  # 20


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


def draw_object(rng, img, kind, cx, cy, r, colour):
    """Paint one object; return (elongation-weighted cos 2t, sin 2t, n_vertices, hole, strokes)."""
    strokes = np.zeros(N_SEG, np.float32)
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
        on = rng.choice(N_SEG, n_on, replace=False)
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


def draw_pretext(rng, n, noise):
    """Images (n,3,32,32) and a dict of targets."""
    xs = []
    T = {k: [] for k in ("kind", "texture", "count", "x", "y", "logr", "hue_c", "hue_s", "val", "or_c", "or_s",
                         "nv", "hole", "tex_c", "tex_s", "tex_p", "bg_c", "bg_s", "bg_v", "strokes")}
    for _ in range(n):
        img = _background(rng)
        bg = img.mean(axis=(0, 1))
        tex = TEXTURES[rng.choice(4, p=[0.45, 0.25, 0.15, 0.15])]
        tc = ts = tp = 0.0
        if tex != "plain":
            mask, ang, per = _texture(rng, tex)
            img[mask] = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.5, 1.0))
            tc, ts, tp = math.cos(2 * ang), math.sin(2 * ang), per
        count = int(rng.integers(0, 6)) if tex == "plain" else int(rng.integers(0, 3))
        objs = []
        for j in range(count):
            kind = KINDS[rng.integers(len(KINDS))]
            r = math.exp(rng.uniform(math.log(2.0), math.log(12.0))) if count <= 2 else rng.uniform(2.0, 5.0)
            cx, cy = rng.uniform(r * 0.6, IMAGE_SIZE - r * 0.6, size=2)
            hue = rng.random()
            colour = _hsv(hue, rng.uniform(0.0, 1.0) if rng.random() < 0.2 else rng.uniform(0.5, 1.0), rng.uniform(0.4, 1.0))
            out = draw_object(rng, img, kind, cx, cy, r, colour)
            objs.append((r, kind, cx, cy, hue, float(colour.max()), out))
        if objs:
            r, kind, cx, cy, hue, val, (c2, s2, nv, hole, strokes) = max(objs, key=lambda o: o[0])
            T["kind"].append(KINDS.index(kind)); T["x"].append(cx / 16 - 1); T["y"].append(cy / 16 - 1)
            T["logr"].append(math.log(r)); T["hue_c"].append(math.cos(2 * math.pi * hue)); T["hue_s"].append(math.sin(2 * math.pi * hue))
            T["val"].append(val); T["or_c"].append(c2); T["or_s"].append(s2); T["nv"].append(nv); T["hole"].append(hole)
            T["strokes"].append(strokes)
        else:
            T["kind"].append(-100)
            for k in ("x", "y", "logr", "hue_c", "hue_s", "val", "or_c", "or_s", "nv", "hole"):
                T[k].append(float("nan"))
            T["strokes"].append(np.full(N_SEG, np.nan, np.float32))
        T["texture"].append(TEXTURES.index(tex)); T["count"].append(count)
        T["tex_c"].append(tc); T["tex_s"].append(ts); T["tex_p"].append(tp)
        bh = _rgb_hue(bg)
        T["bg_c"].append(math.cos(2 * math.pi * bh)); T["bg_s"].append(math.sin(2 * math.pi * bh)); T["bg_v"].append(float(bg.max()))
        _distractors(img, rng, n_max=2)
        xs.append(_finish(img, rng, noise))
    out = {k: np.asarray(v, dtype=np.int64 if k in ("kind", "texture") else np.float32) for k, v in T.items()}
    return np.stack(xs).astype(np.float32), out


def _rgb_hue(rgb):
    import colorsys
    return colorsys.rgb_to_hsv(*np.clip(rgb, 0, 1))[0]


# ----------------------------------------------------------------------------- canonical class renderings
def canonical(task):
    """(C, V, 3, 32, 32) clean exemplars of each class: white (or the class colour) on black, centred, no noise."""
    C = len(TASK_CLASSES[task])
    out = []
    white = np.ones(3, np.float32)
    for c in range(C):
        vs = []
        if task == "digits":
            from sklearn.datasets import load_digits
            d = load_digits()
            order = np.random.default_rng(12345).permutation(len(d.target))
            pool = order[: int(0.6 * len(order))]
            idx = [i for i in pool if d.target[i] == c][:4]
            for i in idx:
                img = np.zeros((32, 32, 3), np.float32)
                g = np.kron(d.images[i].astype(np.float32) / 16, np.ones((3, 3), np.float32))
                img[4:28, 4:28] = g[..., None]
                vs.append(img)
        else:
            img = np.zeros((32, 32, 3), np.float32)
            if task == "shapes":
                img[_shape_mask(TASK_CLASSES[task][c], 16, 16, 7.5)] = white
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
                period = 4.5
                u = {0: _YY, 1: _XX, 2: _XX + _YY, 3: _XX - _YY}.get(c)
                if u is not None:
                    step = period * (math.sqrt(2) if c >= 2 else 1.0)
                    mask = (u % step) < step / 2
                elif c == 4:
                    mask = ((_XX // (period / 1.4)) + (_YY // (period / 1.4))) % 2 == 0
                else:
                    fx, fy = _XX % period - period / 2, _YY % period - period / 2
                    mask = fx**2 + fy**2 <= (period / 3.5) ** 2
                img[mask] = white
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
