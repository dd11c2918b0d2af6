"""The tiny benchmark's generated data."""

from __future__ import annotations

import numpy as np
import pytest

from mergelab.benchmarks.tiny import data as tinydata, pretext
from mergelab.benchmarks.tiny.data import TASK_CLASSES, TASKS, TinyDataConfig, canonical_images, generate_task, load_task
from mergelab.benchmarks.tiny.pretext import (PRETEXT_KINDS, PRETEXT_REGRESSION, PRETEXT_STROKES, PRETEXT_TEXTURES,
                                              load_pretext)

SMALL = TinyDataConfig(n_train=40, n_val=20, n_test=20, n_pretext=16)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_images_in_range_and_valid_labels(task):
    X, y = generate_task(task, "val", SMALL)
    assert X.shape == (20, 3, 32, 32) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert y.dtype == np.int64 and set(np.unique(y)) <= set(range(len(TASK_CLASSES[task])))
    # every class is drawn (labels are not stuck on a few values)
    _, y_large = generate_task(task, "val", TinyDataConfig(n_train=8, n_val=400, n_test=8, n_pretext=16))
    assert set(np.unique(y_large)) == set(range(len(TASK_CLASSES[task])))


def test_at_least_eight_tasks():
    assert len(TASKS) >= 8


def test_same_seed_same_bytes_other_seed_other_images():
    a = generate_task("shapes", "train", SMALL)
    b = generate_task("shapes", "train", SMALL)
    c = generate_task("shapes", "train", TinyDataConfig(seed=1, n_train=40, n_val=20, n_test=20))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_splits_differ():
    Xtr, _ = generate_task("colours", "train", SMALL)
    Xva, _ = generate_task("colours", "val", SMALL)
    assert not np.array_equal(Xtr[:20], Xva)


def test_load_task_caches_atomically(data_dir):
    X, y = load_task("digits", "test", SMALL)
    files = list((data_dir / "tiny").glob("digits-test-*.npz"))
    assert len(files) == 1 and not list((data_dir / "tiny").glob(".*tmp"))
    X2, y2 = load_task("digits", "test", SMALL)
    assert np.array_equal(X, X2) and np.array_equal(y, y2)
    P, targets = load_pretext(SMALL)
    assert P.shape == (16, 3, 32, 32)
    P2, targets2 = load_pretext(SMALL)  # from the cache
    assert np.array_equal(P, P2) and all(np.array_equal(targets[k], targets2[k], equal_nan=True) for k in targets)


def test_the_data_cache_is_stored_uncompressed_and_still_reads_compressed_files(data_dir):
    """Every kernel and worker reads every task: the cache is stored uncompressed (zip entries stored, not
    deflated), and a compressed file of an earlier version is read back unchanged."""
    import zipfile

    X, y = load_task("shapes", "val", SMALL)
    (path,) = (data_dir / "tiny").glob("shapes-val-*.npz")
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    np.savez_compressed(path, X=X + 1, y=y)  # an earlier version's compressed file (other values, to tell)
    X2, y2 = load_task("shapes", "val", SMALL)
    assert np.array_equal(X2, X + 1) and np.array_equal(y2, y)


def test_a_damaged_data_file_is_made_again_with_a_warning_not_read_or_fatal(data_dir):
    """Atomic writes rule out a half-written file from an interrupted run, not one a machine crash or a full disk
    leaves: such a file used to stop every later run inside numpy until it was deleted by hand."""
    X, y = load_task("size", "val", SMALL)
    (path,) = (data_dir / "tiny").glob("size-val-*.npz")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match=r"size-val-.*\.npz is unreadable .*; making it again"):
        X2, y2 = load_task("size", "val", SMALL)
    assert np.array_equal(X2, X) and np.array_equal(y2, y)
    with np.load(path) as f:  # and written again whole
        assert np.array_equal(f["X"], X)


def test_a_damaged_compressed_file_is_read_as_missing_with_a_warning():
    """Corrupt bytes inside a compressed member raise zlib's own error, no OSError or ValueError (the response
    caches are written compressed, and earlier data caches were): read as missing, like a truncated file."""
    import tempfile
    import zlib
    from pathlib import Path

    from mergelab.utils import atomic_save_npz, read_npz

    def zlib_damage(raw: bytes) -> bytes | None:  # the first byte flip inside the data that zlib refuses
        for at in range(80, len(raw) - 200, 7):
            damaged = bytearray(raw)
            damaged[at] ^= 0xFF
            path.write_bytes(bytes(damaged))
            try:
                with np.load(path) as f:
                    f["x"]
            except zlib.error:
                return bytes(damaged)
            except Exception:
                continue
        return None

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.npz"
        atomic_save_npz(path, x=np.random.default_rng(0).normal(size=5000))
        assert read_npz(path)["x"].shape == (5000,)
        damaged = zlib_damage(path.read_bytes())
        assert damaged is not None
        path.write_bytes(damaged)
        with pytest.warns(RuntimeWarning, match=r"c\.npz is unreadable \(error: .*\); making it again"):
            assert read_npz(path) is None
        assert read_npz(Path(tmp) / "missing.npz") is None


def test_pretext_targets_are_consistent():
    P, t = pretext._draw_pretext(np.random.default_rng(0), 200, 0.08)
    assert P.shape == (200, 3, 32, 32) and 0 <= P.min() and P.max() <= 1
    kind, texture, reg, strokes = t["kind"], t["texture"], t["regression"], t["strokes"]
    assert reg.shape == (200, len(PRETEXT_REGRESSION)) and strokes.shape == (200, PRETEXT_STROKES)
    count = reg[:, PRETEXT_REGRESSION.index("count")]
    no_object = kind == -100
    assert np.array_equal(no_object, count == 0)  # the largest object's attributes exist iff there is one
    assert np.isnan(reg[no_object, 1:11]).all() and not np.isnan(reg[~no_object]).any()
    assert set(np.unique(kind[~no_object])) <= set(range(len(PRETEXT_KINDS)))
    assert set(np.unique(texture)) <= set(range(len(PRETEXT_TEXTURES)))
    glyph = kind == PRETEXT_KINDS.index("glyph")
    assert glyph.any() and (strokes[glyph].sum(1) >= 2).all()
    assert (strokes[~glyph & ~no_object] == 0).all()
    bars = kind == PRETEXT_KINDS.index("bar")  # a bar's elongation is 1: cos^2 + sin^2 = 1
    e = reg[bars][:, [PRETEXT_REGRESSION.index("elongation_cos2"), PRETEXT_REGRESSION.index("elongation_sin2")]]
    assert np.allclose((e ** 2).sum(1), 1, atol=1e-5)
    plain = texture == PRETEXT_TEXTURES.index("plain")
    assert (reg[plain, PRETEXT_REGRESSION.index("texture_period")] == 0).all()
    assert (reg[~plain, PRETEXT_REGRESSION.index("texture_period")] >= 3).all()


@pytest.mark.parametrize("task", TASKS)
def test_canonical_images_one_clean_exemplar_set_per_class(task):
    C = canonical_images(task)
    n = len(TASK_CLASSES[task])
    assert C.ndim == 5 and C.shape[0] == n and C.shape[2:] == (3, 32, 32) and C.dtype == np.float32
    assert 0 <= C.min() and C.max() <= 1
    flat = C.reshape(n, -1)
    assert len({row.tobytes() for row in flat}) == n  # classes differ
    assert np.array_equal(C, canonical_images(task))  # deterministic


def test_bad_input_names_the_parameter_and_valid_values():
    with pytest.raises(ValueError, match=r"task='cats' is not a tiny task; valid: digits"):
        generate_task("cats", "train", SMALL)
    with pytest.raises(ValueError, match=r"split='holdout' is not valid"):
        generate_task("digits", "holdout", SMALL)
    with pytest.raises(ValueError, match=r"n_train=0 is not valid"):
        TinyDataConfig(n_train=0)
    with pytest.raises(ValueError, match=r"noise='0.08' is not valid; use a number in \[0, 1\)"):
        TinyDataConfig(noise="0.08")  # a string, as YAML reads a quoted number: refused before any image is drawn
    with pytest.raises(ValueError, match=r"seed=-1 is not valid; use an integer >= 0"):
        TinyDataConfig(seed=-1)
    with pytest.raises(ValueError, match=r"n_pretext=2000.0 is not valid; use a positive integer"):
        TinyDataConfig(n_pretext=2000.0)


def test_digit_splits_use_disjoint_source_digits(monkeypatch):
    seen = {}
    real = np.kron

    def spy(a, b):
        seen.setdefault("glyphs", []).append(a.tobytes())
        return real(a, b)

    monkeypatch.setattr(tinydata.np, "kron", spy)
    generate_task("digits", "train", SMALL)
    train = set(seen.pop("glyphs"))
    generate_task("digits", "test", SMALL)
    test = set(seen.pop("glyphs"))
    assert train and test and not (train & test)


def test_tasks_are_distinct_visual_domains():
    # Like the 8 public datasets, each task has a look of its own: mean colours of the images differ.
    means = {t: generate_task(t, "val", SMALL)[0].mean(axis=(0, 2, 3)) for t in TASKS}
    names = list(means)
    gaps = [np.abs(means[a] - means[b]).max() for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(gaps) > 0.02


def test_canonical_texture_masks_are_the_six_patterns_and_shift_by_whole_periods():
    masks = [tinydata.canonical_texture_mask(c) for c in range(len(TASK_CLASSES["textures"]))]
    assert all(m.shape == (32, 32) and m.dtype == bool and 0 < m.mean() < 1 for m in masks)
    assert len({m.tobytes() for m in masks}) == len(masks)  # six different patterns
    horizontal, vertical = masks[0], masks[1]
    assert (horizontal == horizontal[:, :1]).all() and (vertical == vertical[:1, :]).all()  # stripes along one axis
    np.testing.assert_array_equal(tinydata.canonical_texture_mask(0, 4.0, dy=4.0), tinydata.canonical_texture_mask(0, 4.0))
    assert not np.array_equal(tinydata.canonical_texture_mask(0, 4.0, dy=2.0), tinydata.canonical_texture_mask(0, 4.0))
    c = TASK_CLASSES["textures"].index("horizontal")
    np.testing.assert_array_equal(tinydata.canonical_images("textures")[c, 0, 0] > 0, masks[c])  # the heads' rendering


def test_object_hue_bands_narrow_a_task_and_leave_the_random_stream_as_it_was(monkeypatch):
    """``OBJECT_HUES`` (empty in the package; the design record's palette lever sets it) draws a task's
    object hues from a band of width .08 around its centre, with the same draws, so the rest of the
    image is unchanged."""
    rng_free, rng_band = np.random.default_rng(1), np.random.default_rng(1)
    free = np.array([tinydata._object_hue(rng_free, "counting") for _ in range(500)])
    monkeypatch.setitem(tinydata.OBJECT_HUES, "counting", 0.98)
    band = np.array([tinydata._object_hue(rng_band, "counting") for _ in range(500)])
    assert free.max() - free.min() > 0.9  # uniform hues without a band
    distance = np.minimum(np.abs(band - 0.98), 1 - np.abs(band - 0.98))  # on the hue circle
    assert distance.max() <= 0.04 and (band >= 0).all() and (band < 1).all()
    assert rng_free.random() == rng_band.random()
    assert tinydata._object_hue(np.random.default_rng(2), "shapes") == np.random.default_rng(2).random()
