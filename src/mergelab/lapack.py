"""The top eigenpairs of a symmetric matrix with LAPACK's ``syevr``, called without holding the GIL.

Why this exists. TSV-M needs only the top ``k`` eigenvectors of each task's ``(n, n)`` Gram
matrix (``k = n / T``). LAPACK's ``syevr`` computes just those, which takes about half the time of a
full ``syevd`` for ViT-B-32's ``768 x 768`` Gram matrices at ``T = 8``. SciPy exposes ``syevr``
(``scipy.linalg.eigh(..., subset_by_index=..., driver="evr")``), but its wrapper holds Python's
global interpreter lock while LAPACK runs, so calls from several threads take turns. On a 2-core
machine that makes the subset solver no faster than NumPy's full ``syevd`` run two at a time.

So :func:`eigh_top` calls the very same routine, SciPy's ``dsyevr``/``ssyevr``, through the function
pointers that ``scipy.linalg.cython_lapack`` publishes for compiled extensions, with :mod:`ctypes`,
which releases the GIL during a foreign call. Same library, same arguments, same results as
``scipy.linalg.eigh(driver="evr")`` (the tests check this), but calls in parallel threads overlap.
If the pointers cannot be had (a SciPy without ``cython_lapack``), it falls back to
``scipy.linalg.eigh``: same results, no overlap.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_P = ctypes.c_void_p


@functools.lru_cache(maxsize=2)
def _syevr(prefix: str):
    """``dsyevr``/``ssyevr`` from ``scipy.linalg.cython_lapack`` as a ctypes function, or ``None``."""
    try:
        import scipy.linalg.cython_lapack as cython_lapack

        capsule = cython_lapack.__pyx_capi__[f"{prefix}syevr"]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        pointer = get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):  # pragma: no cover - depends on the SciPy build
        return None
    # void ?syevr(char *jobz, char *range, char *uplo, int *n, T *a, int *lda, T *vl, T *vu, int *il,
    #             int *iu, T *abstol, int *m, T *w, T *z, int *ldz, int *isuppz, T *work, int *lwork,
    #             int *iwork, int *liwork, int *info)
    return ctypes.CFUNCTYPE(None, *([_P] * 21))(pointer)


def available() -> bool:
    """Whether :func:`eigh_top` runs without the GIL (SciPy publishes ``cython_lapack``'s pointers)."""
    return _syevr("d") is not None and _syevr("s") is not None


def eigh_top(g: np.ndarray, k: int, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (decreasing) and their eigenvectors of a symmetric matrix.

    Args:
        g: ``(n, n)`` symmetric, float32 or float64 (other dtypes are converted to float64).
        k: how many eigenpairs, ``1..n``.
        overwrite: allow ``g`` to be destroyed (saves a copy when ``g`` is C- or Fortran-contiguous
            and of a float dtype).

    Returns:
        ``w (k,)`` decreasing and ``v (n, k)`` with orthonormal columns, ``g v = v diag(w)``, in ``g``'s
        dtype (float32 or float64).
    """
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g has shape {g.shape}; pass a square (n, n) symmetric matrix.")
    n = g.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} is not valid for a {n} x {n} matrix; use an integer in 1..{n}.")
    k = int(k)
    dtype = g.dtype if g.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    fn = _syevr("s" if dtype == np.float32 else "d")
    if fn is None:  # pragma: no cover - depends on the SciPy build
        import scipy.linalg

        w, v = scipy.linalg.eigh(g.astype(dtype, copy=False), subset_by_index=[n - k, n - 1], driver="evr",
                                 check_finite=False)
        return w[::-1].copy(), v[:, ::-1].copy()
    # A symmetric C-ordered matrix is its own transpose, so it can be handed over as Fortran-ordered.
    contiguous = g.flags.c_contiguous or g.flags.f_contiguous
    a = g if (overwrite and contiguous and g.dtype == dtype) else np.array(g, dtype=dtype, order="C")
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    jobz, rng, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"L")
    n_, lda, ldz = ctypes.c_int(n), ctypes.c_int(n), ctypes.c_int(n)
    vl, vu, abstol = real(0), real(0), real(0)
    il, iu, found, info = ctypes.c_int(n - k + 1), ctypes.c_int(n), ctypes.c_int(0), ctypes.c_int(0)
    w = np.empty(n, dtype=dtype)
    z = np.empty((k, n), dtype=dtype)  # Fortran (n, k): row j of this C array is eigenvector j
    isuppz = np.empty(2 * k, dtype=np.intc)
    by = ctypes.byref

    def call(work, lwork: ctypes.c_int, iwork, liwork: ctypes.c_int) -> None:
        fn(by(jobz), by(rng), by(uplo), by(n_), a.ctypes.data, by(lda), by(vl), by(vu), by(il), by(iu),
           by(abstol), by(found), w.ctypes.data, z.ctypes.data, by(ldz), isuppz.ctypes.data, work, by(lwork),
           iwork, by(liwork), by(info))

    work_size, iwork_size = real(0), ctypes.c_int(0)
    call(by(work_size), ctypes.c_int(-1), by(iwork_size), ctypes.c_int(-1))  # workspace query
    work = np.empty(max(1, int(work_size.value)), dtype=dtype)
    iwork = np.empty(max(1, iwork_size.value), dtype=np.intc)
    call(work.ctypes.data, ctypes.c_int(work.size), iwork.ctypes.data, ctypes.c_int(iwork.size))
    if info.value != 0 or found.value != k:
        raise np.linalg.LinAlgError(f"LAPACK {'s' if dtype == np.float32 else 'd'}syevr failed "
                                    f"(info={info.value}, {found.value} of {k} eigenpairs found).")
    return w[:k][::-1].copy(), z[::-1].T.copy()
