"""mergelab.lapack: syevr without the GIL gives what SciPy's syevr gives."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.linalg

from mergelab.linalg._lapack import available, eigh_all, eigh_top


def symmetric(n: int, dtype, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((2 * n, n)) / np.arange(1, n + 1)
    return (a.T @ a).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_eigh_top_equals_scipys_syevr(dtype, k):
    g = symmetric(40, dtype)
    w, v = eigh_top(g, k)
    w0, v0 = scipy.linalg.eigh(g, subset_by_index=[40 - k, 39], driver="evr")
    assert w.dtype == dtype and v.dtype == dtype and v.shape == (40, k)
    np.testing.assert_array_equal(w, w0[::-1])
    np.testing.assert_array_equal(v, v0[:, ::-1])
    assert np.all(np.diff(w) <= 0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(g.astype(np.float64) @ v, v * w, atol=tol * w[0])
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=50 * tol)


def test_eigh_top_leaves_its_input_alone_unless_allowed():
    g = symmetric(30, np.float64)
    before = g.copy()
    eigh_top(g, 5)
    np.testing.assert_array_equal(g, before)
    w, _ = eigh_top(g, 5, overwrite=True)
    np.testing.assert_allclose(w, np.linalg.eigvalsh(before)[::-1][:5], rtol=1e-12)


def test_eigh_top_converts_other_dtypes_and_non_contiguous_input():
    g = symmetric(20, np.float64)
    m = np.asfortranarray(g)[:, :].astype(np.float16).astype(np.int64)
    w, v = eigh_top(m, 3)
    assert w.dtype == np.float64  # converted, and the eigenvalues are the integer matrix's own
    np.testing.assert_allclose(w, np.linalg.eigvalsh(m.astype(np.float64))[::-1][:3], rtol=1e-12, atol=1e-12)
    view = np.zeros((40, 40))
    view[::2, ::2] = g
    w2, _ = eigh_top(view[::2, ::2], 3)
    np.testing.assert_allclose(w2, np.linalg.eigvalsh(g)[::-1][:3], rtol=1e-12)


SOLVERS = {"eigh_top": lambda g, **kw: eigh_top(g, 8, **kw), "eigh_all": eigh_all}


def in_threads(fn, items: list) -> list:
    """``[fn(x) for x in items]``, every call in its own thread, all at once."""
    out: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(items[i]))) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [out[i] for i in range(len(items))]


@pytest.mark.parametrize("solver", SOLVERS.values(), ids=SOLVERS.keys())
def test_calls_from_threads_give_the_same_results(solver):
    mats = [symmetric(64, np.float64, seed) for seed in range(6)]
    alone = [solver(g) for g in mats]
    for (w, v), (w2, v2) in zip(alone, in_threads(lambda g: solver(g, overwrite=True), mats)):
        np.testing.assert_array_equal(w2, w)
        np.testing.assert_array_equal(v2, v)


def test_the_gil_free_path_is_available_with_this_scipy():
    # SciPy >= 1.11 (the declared minimum) publishes cython_lapack's pointers; without them the
    # fallback still gives the same results, only without overlap.
    assert available()


@pytest.mark.parametrize("bad, match", [((np.zeros((3, 4)), 1), "square"), ((np.eye(3), 0), "k=0"),
                                        ((np.eye(3), 4), "1..3")])
def test_bad_input_names_the_parameter(bad, match):
    with pytest.raises(ValueError, match=match):
        eigh_top(*bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_eigh_all_equals_scipys_syevd(dtype):
    g = symmetric(50, dtype)
    w, v = eigh_all(g)
    w0, v0 = scipy.linalg.eigh(g, driver="evd")
    assert w.dtype == dtype and v.dtype == dtype and v.shape == (50, 50)
    np.testing.assert_array_equal(w, w0[::-1])
    np.testing.assert_array_equal(v, v0[:, ::-1])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(g.astype(np.float64) @ v, v * w, atol=tol * w[0])
    np.testing.assert_allclose(v.T @ v, np.eye(50), atol=50 * tol)


def test_eigh_all_leaves_its_input_alone_unless_allowed():
    g = symmetric(48, np.float64)
    before = g.copy()
    w, _ = eigh_all(g)
    np.testing.assert_array_equal(g, before)
    w2, _ = eigh_all(g, overwrite=True)
    np.testing.assert_array_equal(w2, w)
    with pytest.raises(ValueError, match="square"):
        eigh_all(np.zeros((3, 4)))
