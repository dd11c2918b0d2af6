"""Truncated SVDs of stacks of matrices: ``(T, m, n) -> U (T, m, k), s (T, k), V (T, n, k)``.

Three solvers (``svd=``): ``"gram"`` (top-``k`` eigenvectors of each ``(n, n)`` Gram matrix in
float64, exact up to rounding), ``"exact"`` (batched ``torch.linalg.svd``) and ``"randomized"``
(subspace iteration). See :mod:`mergelab.merging.tsv` for where the speed matters and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..utils import check_integer, check_number
from . import _kernels
from ._kernels import (
    _check_choice,
    _check_rank,
    _cpu_map,
    _gram_dtype,
    _np_task_svd,
    _to_numpy,
    _torch_task_svd,
)

SVD_METHODS = ("gram", "exact", "randomized")
"""Solvers for the per-task truncated SVD in :func:`truncated_svd`."""

RTOL = 1e-6
"""Singular values ``<= RTOL * s_max`` of their matrix are treated as zero (no direction)."""

RTOL_GRAM32 = 1e-3
"""The same cut-off when the Gram matrix is formed in float32: its eigenvalues carry an absolute
error of about ``1e-7 * s_max^2``, so singular values below ``~3e-4 * s_max`` are not resolved."""

def default_rank(shape: Sequence[int], num_tasks: int | None = None, rank_fraction: float | None = None) -> int:
    """Triplets kept per task for an ``(m, n)`` matrix.

    ``floor(min(m, n) / num_tasks)`` (the TSV default) or ``floor(min(m, n) * rank_fraction)``, at
    least 1 and at most ``min(m, n)``.
    """
    if len(shape) != 2:
        raise ValueError(f"shape={tuple(shape)!r} is not a matrix shape; TSV decomposes 2-D tensors only.")
    full = min(int(shape[0]), int(shape[1]))
    if rank_fraction is not None:
        if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float, np.floating)) \
                or not 0 < rank_fraction <= 1:
            raise ValueError(f"rank_fraction={rank_fraction!r} is not valid; use a fraction in (0, 1] "
                             "of min(m, n) singular triplets to keep.")
        k = math.floor(full * rank_fraction + 1e-9)
    elif num_tasks is not None:
        if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks!r} is not valid; use a positive integer.")
        k = full // int(num_tasks)
    else:
        raise ValueError("give num_tasks (k = floor(min(m, n) / T)) or rank_fraction (k = floor(min(m, n) * f)).")
    return max(1, min(full, k))


def _check_solver_options(rtol: float, oversample: int | None, n_iter: int, seed: int) -> None:
    """Refuse solver options that would silently drop every triplet (``rtol`` NaN or >= 1) or fail deep in torch,
    naming the option, its value and what is valid."""
    check_number("rtol", rtol, low=0, high=1, high_open=True)
    if oversample is not None:
        check_integer("oversample", oversample, minimum=0)
    check_integer("n_iter", n_iter, minimum=0)
    check_integer("seed", seed, minimum=0)

# ----------------------------------------------------------------------------- truncated SVD
def _drop_null(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, rtol: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero the triplets whose singular value is ``<= rtol * s_max`` (their vectors are arbitrary)."""
    keep = s > rtol * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    s = torch.where(keep, s, torch.zeros_like(s))
    mask = keep.unsqueeze(-2).to(U.dtype)
    return U * mask, s, V * mask


def truncated_svd(matrices: torch.Tensor, k: int, svd: str = "gram", gram_dtype: torch.dtype | str = "float64",
                  rtol: float | None = None, oversample: int | None = None, n_iter: int = 4, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of one matrix ``(m, n)`` or a batch ``(T, m, n)``.

    Args:
        matrices: ``(m, n)`` or ``(T, m, n)``, any float dtype, CPU or GPU.
        k: triplets to keep, ``1..min(m, n)``.
        svd: ``"gram"`` (the top ``k`` eigenvectors of the ``(n, n)`` Gram matrix ``A^T A`` of the
            tall side, then ``U = A V / s``; see :func:`_gram_svd`), ``"exact"`` (batched
            ``torch.linalg.svd``) or ``"randomized"`` (subspace iteration; approximate where the
            spectrum decays slowly).
        gram_dtype: precision of the Gram matrix: ``"float64"`` (exact to rounding) or ``"float32"``
            (faster on a CPU, with errors of about ``1e-7 (s_1 / s_k)^2`` in the ``k``-th singular
            vectors: around ``1e-4`` relative on ViT-B-32-shaped task vectors at ``T = 8``, up to
            ``4e-2`` at ``T = 2``, and 0.4 on steeply decaying spectra; see the module docstring).
        rtol: singular values ``<= rtol * s_max`` count as zero and their triplets are zeroed
            (default :data:`RTOL`, or :data:`RTOL_GRAM32` for a float32 Gram matrix).
        oversample: extra columns of the randomized range finder (default ``max(10, k // 2)``).
        n_iter: power iterations of the randomized solver.
        seed: seed of the randomized solver's test matrix.

    Returns:
        ``U (..., m, k)``, ``s (..., k)`` (non-increasing), ``V (..., n, k)`` in the input's float
        dtype and device, with ``matrices ~ U diag(s) V^T``; zeroed triplets have zero columns.
    """
    _check_choice("svd", svd, SVD_METHODS)
    f64 = _gram_dtype(gram_dtype) == torch.float64
    if rtol is None:
        rtol = RTOL_GRAM32 if (svd == "gram" and not f64) else RTOL
    _check_solver_options(rtol, oversample, n_iter, seed)
    if matrices.ndim not in (2, 3):
        raise ValueError(f"matrices has shape {tuple(matrices.shape)}; pass (m, n) or (T, m, n).")
    single = matrices.ndim == 2
    A = matrices.unsqueeze(0) if single else matrices
    k = _check_rank(k, A.shape)
    dtype = A.dtype if A.dtype in (torch.float32, torch.float64) else torch.float32
    A = A.to(dtype)
    transposed = A.shape[-2] < A.shape[-1]
    if transposed:  # work with the tall side: (T, m, n), m >= n
        A = A.transpose(-2, -1)
    if svd == "exact":
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        U, s, V = U[..., :k], s[..., :k], Vh[..., :k, :].transpose(-2, -1)
    elif svd == "gram":
        U, s, V = (x.to(dtype) for x in _gram_svd(A, k, f64, rtol))
    else:
        U, s, V = _randomized_svd(A, k, oversample if oversample is not None else max(10, k // 2), n_iter, seed)
    U, s, V = _drop_null(U, s, V, rtol)
    if transposed:
        U, V = V, U
    if single:
        return U[0], s[0], V[0]
    return U, s, V


def _gram_svd(A: torch.Tensor, k: int, f64: bool, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of tall ``(T, m, n)`` matrices from their Gram matrices ``A^T A`` ``(T, n, n)``.

    float64: the top ``k`` eigenvectors ``V`` of the float64 Gram matrix (see :func:`_np_eigh_top`),
    ``s = sqrt(eigenvalues)``, ``U = A V / s``. float32: the float32 Gram matrix's
    rounding (``~1e-6 * s_max^2``) mixes the ``k``-th singular vector with its neighbours where the
    spectrum is flat, so we take ``k + p`` eigenvectors (``p = max(8, k // 4)``) and split that
    subspace with a float64 Rayleigh-Ritz step (``B = A V_{k+p}``, eigenvectors of ``B^T B``). That
    repairs the mixing at the cut but not the float32 eigenvectors' own error, about
    ``1e-7 (s_1 / s_k)^2`` (measured: the error does not fall as ``p`` grows from ``k / 4`` to ``k``).

    On the CPU each task is single-threaded and tasks run in parallel (:func:`_cpu_map`); on a GPU,
    and for small matrices (short side below :data:`SMALL`), the same steps run batched over tasks
    with torch. Returns float64 ``U, s, V``.
    """
    if A.device.type == "cpu" and A.shape[-1] >= _kernels.SMALL:
        out = _cpu_map(lambda a: _np_task_svd(a, k, f64, rtol), _to_numpy(A))
        return tuple(torch.from_numpy(np.stack([o[i] for o in out])) for i in range(3))  # type: ignore[return-value]
    return _torch_task_svd(A, k, f64, rtol)


def _randomized_svd(A: torch.Tensor, k: int, oversample: int, n_iter: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched randomized SVD ``(T, m, n) -> U (T, m, k), s (T, k), V (T, n, k)`` by subspace
    iteration (Halko, Martinsson & Tropp, 2011), re-orthonormalizing after every product."""
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample={oversample!r} and n_iter={n_iter!r} must be non-negative integers.")
    n = A.shape[-1]
    width = min(n, k + oversample)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=g, dtype=A.dtype).to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    At = A.transpose(-2, -1)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(At @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    Ub, s, Vh = torch.linalg.svd(Q.transpose(-2, -1) @ A, full_matrices=False)
    return (Q @ Ub[..., :k]), s[..., :k], Vh[..., :k, :].transpose(-2, -1)


def stack_kept(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T, m, k), (T, k), (T, n, k) -> (m, T k), (T k,), (n, T k)``: task blocks side by side."""
    T, m, k = U.shape
    n = V.shape[1]
    return U.permute(1, 0, 2).reshape(m, T * k), s.reshape(T * k), V.permute(1, 0, 2).reshape(n, T * k)
