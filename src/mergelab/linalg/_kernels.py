"""Solver kernels behind :mod:`mergelab.linalg`: NumPy/LAPACK on the CPU (GIL-free, tasks side by side)
and batched torch on a GPU. Private to :mod:`mergelab.linalg`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import _lapack as lapack


def _gram_dtype(value: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` / ``torch.float64`` from a dtype or its name (``"float32"``, ``"float64"``)."""
    named = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
             torch.float64: torch.float64}
    if value not in named:
        raise ValueError(f"gram_dtype={value!r} is not valid; use 'float32' or 'float64' (or the torch dtypes).")
    return named[value]


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, valid))}.")


def _check_rank(k: int, shape: Sequence[int]) -> int:
    full = min(int(shape[-2]), int(shape[-1]))
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= full:
        raise ValueError(f"k={k!r} is not valid for a {tuple(shape[-2:])} matrix; use an integer in 1..{full}.")
    return int(k)


# ----------------------------------------------------------------------------- CPU kernels
def _cpu_map(fn, items: Sequence) -> list:
    """Apply ``fn`` to every item, one BLAS thread per call and calls in parallel threads.

    The reductions inside dense eigen- and singular-value solvers (to tridiagonal or bidiagonal
    form) are memory-bound and gain little from a second thread, and on a shared machine whose cores
    are oversubscribed a multi-threaded solver can run several times slower than a single-threaded
    one (its threads spin at barriers while their partners wait for a core). So on the CPU each
    task's work is single-threaded NumPy/SciPy, and tasks run side by side on
    ``torch.get_num_threads()`` threads: NumPy's products and SVD, and SciPy's ``syevr`` and ``syevd``
    called through :mod:`mergelab.linalg._lapack`, release the GIL and run in parallel.
    """
    workers = _cpu_workers(len(items))
    with _blas_controller().limit(limits=1, user_api="blas"):
        if workers == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))


def _cpu_workers(n_items: int) -> int:
    """Threads :func:`_cpu_map` uses for ``n_items`` independent calls."""
    return max(1, min(n_items, torch.get_num_threads()))


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (scanned once; SciPy's is loaded first,
    because threadpoolctl only sees libraries already loaded)."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


POLAR_GRAM_MIN_RATIO = {torch.float32: 1e-2, torch.float64: 1e-9}
"""``"gram"`` polar factors are used only when the Gram matrix's eigenvalues satisfy
``lambda_min >= ratio * lambda_max`` (its rounding error divided by ``lambda_min`` stays small):
a float32 Gram matrix is tried first (relative error about ``1e-6`` when the ratio is above
``1e-2``), then a float64 one; otherwise (nearly dependent columns, e.g. identical tasks) the
float64 SVD is used."""

POLAR_GRAM_MIN_ASPECT = 2.0
"""On the CPU a float32 Gram matrix is tried only for stacks with ``m >= 2 r``; near-square stacks are
rarely conditioned well enough for it, so they try the float64 one only (still about 1.7 times
cheaper than the SVD for ``768 x 768``), and the SVD where even that fails the test."""


SMALL = 128
"""Matrices whose short side is below this are handled by batched torch calls on the CPU too: for
them the thread pool's overhead outweighs its gain."""


def _to_numpy(X: torch.Tensor) -> list[np.ndarray]:
    """``(..., m, n)`` tensor to a list of float32/float64 ``(m, n)`` arrays, views where possible.

    Not copied to C order: the transposed view of a wide stack is Fortran-ordered, which BLAS takes as
    it is (copying a ``(8, 3072, 768)`` stack took 70 ms of a 0.5 s layer)."""
    X = X.detach().cpu()
    X = X if X.dtype in (torch.float32, torch.float64) else X.float()
    return list(X.reshape(-1, *X.shape[-2:]).numpy())


def _np_gram(a: np.ndarray) -> np.ndarray:
    """``a^T a``. A NumPy product rather than SciPy's ``syrk`` (half the flops) because NumPy
    releases the GIL, so that the tasks' Gram matrices are formed in parallel."""
    return a.T @ a


def _np_eigh_top(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` eigenpairs (decreasing) of a symmetric matrix; ``g`` may be overwritten.

    ``k < n``: LAPACK ``syevr``, which computes only the ``k`` eigenvectors asked for; ``k = n``:
    ``syevd``, faster than ``syevr`` for the whole spectrum. Both are SciPy's, called without holding
    the GIL so that calls from several threads run side by side (:mod:`mergelab.linalg._lapack`).
    """
    if k < g.shape[0]:
        return lapack.eigh_top(g, k, overwrite=True)
    return lapack.eigh_all(g, overwrite=True)


def float32_padding(n: int, k: int) -> int:
    """Extra eigenvectors of a float32 Gram matrix that :func:`_np_task_svd` splits again in float64 for a top-``k``
    SVD of ``n`` columns: ``max(8, k // 4)``, at most ``n - k``."""
    return min(n - k, max(8, k // 4))


def _np_task_svd(a: np.ndarray, k: int, f64: bool, rtol: float, pad: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` SVD of one tall ``(m, n)`` matrix from its Gram matrix (float64 results; see
    :func:`_gram_svd`); ``pad``: the float32 path's extra eigenvectors (``None``: :func:`float32_padding`)."""
    n = a.shape[1]
    a64 = a.astype(np.float64, copy=False)
    if f64:
        w, v = _np_eigh_top(_np_gram(a64), k)
        b = a64 @ v
    else:
        p = float32_padding(n, k) if pad is None else pad
        _, v32 = _np_eigh_top(_np_gram(a.astype(np.float32, copy=False)), k + p)
        v64 = v32.astype(np.float64)
        b = a64 @ v64
        w, rot = _np_eigh_top(_np_gram(b), k)
        v, b = v64 @ rot, b @ rot
    s = np.sqrt(np.clip(w, 0, None))
    good = s > rtol * max(float(s[0]), 1e-300)
    return b / np.where(good, s, 1.0), s, v


def polar_null_tol(shape: tuple[int, ...], rtol: float | None) -> float:
    """Relative cut-off below which a singular value of an ``(m, r)`` stack counts as zero in a polar
    factor: ``rtol`` when given, else rounding level, ``max(m, r) * eps(float64)`` (NumPy's
    ``matrix_rank`` convention; the SVD runs in float64)."""
    if rtol is not None:
        return float(rtol)
    return max(int(shape[-2]), int(shape[-1])) * float(np.finfo(np.float64).eps)


def _np_polar(x: np.ndarray, rtol: float | None, gram: bool) -> np.ndarray:
    """Polar factor of one ``(m, r)`` matrix, ``m >= r``, in its dtype (see :func:`polar_factor`)."""
    # Tall stacks are usually well conditioned: float32 first, then float64. Near-square stacks
    # rarely pass the float32 test, so they try the float64 Gram matrix only.
    tall = x.shape[0] >= POLAR_GRAM_MIN_ASPECT * x.shape[1]
    dtypes = (([np.float32] if tall else []) + [np.float64]) if gram else []
    for dtype in dtypes:
        xg = x.astype(dtype, copy=False)
        w, q = lapack.eigh_all(_np_gram(xg), overwrite=True)
        if w[-1] >= POLAR_GRAM_MIN_RATIO[torch.float64 if dtype == np.float64 else torch.float32] * w[0] > 0:
            h = q / np.sqrt(np.sqrt(w))  # (X^T X)^{-1/2} = h h^T, a syrk: half the flops of q diag q^T
            return (xg @ (h @ h.T)).astype(x.dtype, copy=False)
    x64 = x.astype(np.float64, copy=False)
    p, sv, qh = np.linalg.svd(x64, full_matrices=False)  # gesdd; NumPy releases the GIL
    keep = (sv > polar_null_tol(x.shape, rtol) * max(float(sv[0]), 1e-300)).astype(p.dtype)
    return ((p * keep) @ qh).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------- torch kernels (GPU)
def _torch_eigh_top(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (decreasing) of a batch of symmetric matrices with ``torch.linalg.eigh``."""
    w, v = torch.linalg.eigh(g)
    return w.flip(-1)[..., :k], v.flip(-1)[..., :k]


def _torch_task_svd(A: torch.Tensor, k: int, f64: bool, rtol: float, pad: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_np_task_svd` batched over ``(T, m, n)`` with torch (used on GPUs; float64 results)."""
    n = A.shape[-1]
    A64 = A.double()
    if f64:
        w, V = _torch_eigh_top(A64.transpose(-2, -1) @ A64, k)
        B = A64 @ V
    else:
        A32 = A.float()
        p = float32_padding(n, k) if pad is None else pad
        _, V32 = _torch_eigh_top(A32.transpose(-2, -1) @ A32, k + p)
        V64 = V32.double()
        B = A64 @ V64
        w, rot = _torch_eigh_top(B.transpose(-2, -1) @ B, k)
        V, B = V64 @ rot, B @ rot
    s = w.clamp_min(0).sqrt()
    good = s > rtol * s[..., :1].clamp_min(1e-300)
    return B / torch.where(good, s, torch.ones_like(s)).unsqueeze(-2), s, V


def _torch_polar(X: torch.Tensor, rtol: float | None, gram: bool) -> torch.Tensor:
    """:func:`_np_polar` for ``(..., m, r)`` with torch (used on GPUs)."""
    for dtype in (torch.float32, torch.float64) if gram else ():
        Xg = X.to(dtype)
        w, Q = torch.linalg.eigh(Xg.transpose(-2, -1) @ Xg)
        if bool(((w[..., 0] >= POLAR_GRAM_MIN_RATIO[dtype] * w[..., -1]) & (w[..., -1] > 0)).all()):
            return (Xg @ ((Q * w.rsqrt().unsqueeze(-2)) @ Q.transpose(-2, -1))).to(X.dtype)
    P, S, Qh = torch.linalg.svd(X.double(), full_matrices=False)
    tol = polar_null_tol(tuple(X.shape), rtol)
    keep = (S > tol * S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)).to(P.dtype).unsqueeze(-2)
    return ((P * keep) @ Qh).to(X.dtype)
