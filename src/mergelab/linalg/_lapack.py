"""Symmetric eigensolvers of SciPy's LAPACK (``syevr``, ``syevd``), called without holding the GIL.

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

:func:`eigh_all` does the same for the whole spectrum with ``syevd`` (divide and conquer), which the
polar factors need. ``numpy.linalg.eigh`` also releases the GIL, but it was slower here: for a
``768 x 768`` matrix on one core of the development machine (AMD EPYC), it took 138 ms in float64
and 134 ms in float32, against 115 ms and 70 ms for SciPy's ``syevd``
(``scipy.linalg.eigh(driver="evd")``).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_P = ctypes.c_void_p


@functools.lru_cache(maxsize=None)
def _routine(name: str, n_args: int):
    """The LAPACK routine ``name`` (e.g. ``"dsyevr"``) from ``scipy.linalg.cython_lapack`` as a ctypes
    function of ``n_args`` pointer arguments, or ``None``."""
    try:
        import scipy.linalg.cython_lapack as cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        pointer = get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):  # pragma: no cover - depends on the SciPy build
        return None
    return ctypes.CFUNCTYPE(None, *([_P] * n_args))(pointer)


def _syevr(prefix: str):
    # void ?syevr(char *jobz, char *range, char *uplo, int *n, T *a, int *lda, T *vl, T *vu, int *il,
    #             int *iu, T *abstol, int *m, T *w, T *z, int *ldz, int *isuppz, T *work, int *lwork,
    #             int *iwork, int *liwork, int *info)
    return _routine(f"{prefix}syevr", 21)


def _syevd(prefix: str):
    # void ?syevd(char *jobz, char *uplo, int *n, T *a, int *lda, T *w, T *work, int *lwork, int *iwork,
    #             int *liwork, int *info)
    return _routine(f"{prefix}syevd", 11)


def available() -> bool:
    """Whether :func:`eigh_top` and :func:`eigh_all` run without the GIL (SciPy publishes
    ``cython_lapack``'s pointers)."""
    return all(f(p) is not None for f in (_syevr, _syevd) for p in "sd")


def _square(g: np.ndarray) -> int:
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"g has shape {g.shape}; pass a square (n, n) symmetric matrix.")
    return g.shape[0]


def _working_copy(g: np.ndarray, overwrite: bool) -> np.ndarray:
    """``g`` itself when it may be destroyed and LAPACK can take it as it is, else a C-ordered copy
    in float32/float64. A symmetric C-ordered matrix is its own transpose, so it can be handed over
    as Fortran-ordered."""
    dtype = g.dtype if g.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    contiguous = g.flags.c_contiguous or g.flags.f_contiguous
    return g if (overwrite and contiguous and g.dtype == dtype) else np.array(g, dtype=dtype, order="C")


def _with_workspace(call, dtype: np.dtype) -> None:
    """Run a LAPACK ``call(work, lwork, iwork, liwork)`` (ctypes arguments) twice: a workspace query
    (``lwork = liwork = -1``), then the real call with workspaces of the sizes LAPACK asked for."""
    by = ctypes.byref
    work_size, iwork_size = (ctypes.c_float if dtype == np.float32 else ctypes.c_double)(0), ctypes.c_int(0)
    call(by(work_size), ctypes.c_int(-1), by(iwork_size), ctypes.c_int(-1))
    work = np.empty(max(1, int(work_size.value)), dtype=dtype)
    iwork = np.empty(max(1, iwork_size.value), dtype=np.intc)
    call(work.ctypes.data, ctypes.c_int(work.size), iwork.ctypes.data, ctypes.c_int(iwork.size))


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
    n = _square(g)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} is not valid for a {n} x {n} matrix; use an integer in 1..{n}.")
    k = int(k)
    a = _working_copy(g, overwrite)
    dtype = a.dtype
    fn = _syevr("s" if dtype == np.float32 else "d")
    if fn is None:  # pragma: no cover - depends on the SciPy build
        import scipy.linalg

        w, v = scipy.linalg.eigh(a, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
        return w[::-1].copy(), v[:, ::-1].copy()
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

    _with_workspace(call, dtype)
    if info.value != 0 or found.value != k:
        raise np.linalg.LinAlgError(f"LAPACK {'s' if dtype == np.float32 else 'd'}syevr failed "
                                    f"(info={info.value}, {found.value} of {k} eigenpairs found).")
    return w[:k][::-1].copy(), z[::-1].T.copy()


def eigh_all(g: np.ndarray, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (decreasing) and eigenvectors of a symmetric matrix, with LAPACK ``syevd``.

    Args:
        g: ``(n, n)`` symmetric, float32 or float64 (other dtypes are converted to float64).
        overwrite: allow ``g`` to be destroyed (its memory then holds the eigenvectors).

    Returns:
        ``w (n,)`` decreasing and ``v (n, n)`` orthogonal, ``g v = v diag(w)``, in ``g``'s dtype; ``v``
        is a view (of ``g`` when it was overwritten).
    """
    n = _square(g)
    a = _working_copy(g, overwrite)
    dtype = a.dtype
    fn = _syevd("s" if dtype == np.float32 else "d")
    if fn is None:  # pragma: no cover - depends on the SciPy build
        import scipy.linalg

        w, v = scipy.linalg.eigh(a, driver="evd", check_finite=False)
        return w[::-1].copy(), v[:, ::-1]
    jobz, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"L")
    n_, lda, info = ctypes.c_int(n), ctypes.c_int(n), ctypes.c_int(0)
    w = np.empty(n, dtype=dtype)
    by = ctypes.byref

    def call(work, lwork: ctypes.c_int, iwork, liwork: ctypes.c_int) -> None:
        fn(by(jobz), by(uplo), by(n_), a.ctypes.data, by(lda), w.ctypes.data, work, by(lwork), iwork,
           by(liwork), by(info))

    _with_workspace(call, dtype)
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {'s' if dtype == np.float32 else 'd'}syevd failed (info={info.value}).")
    # ``a`` now holds the eigenvectors in Fortran order: row j of the C array is eigenvector j.
    return w[::-1].copy(), a[::-1].T
