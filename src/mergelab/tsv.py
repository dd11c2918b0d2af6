"""Task Singular Vectors (TSV): low-rank task matrices, TSV-C compression, TSV-M merging, interference.

Gargiulo et al. (CVPR 2025) look at a task vector one weight matrix at a time. Each *task matrix*
``Delta_t`` (the update of one 2-D parameter, ``(d_out, d_in)``) is close to low-rank, so

* **TSV-C** keeps each task's top ``k`` singular triplets (``k = floor(min(m, n) / T)``) and rebuilds
  the task's update when the task is known: a fraction of the storage for almost all the accuracy;
* **Singular Task Interference** (STI) measures how much the tasks' singular vectors overlap;
* **TSV-M** merges by stacking every task's kept singular vectors, replacing each stack by its polar
  factor (the closest matrix with orthonormal columns), and rebuilding one update
  ``U_perp diag(s) V_perp^T`` with the singular values unchanged: ``theta_0 + alpha * update``.

Which tensors are decomposed (as in the official code): 2-D parameters (attention ``in_proj`` and
``out_proj``, MLP ``c_fc`` and ``c_proj``, the ``positional_embedding`` and the visual ``proj``);
``text_projection`` is not. Every other tensor (biases, LayerNorm, class embedding, the 4-D ``conv1``
stem) is averaged over tasks by TSV-M and stored in full by TSV-C. See :func:`layer_kind`.

Conventions and choices made here (the paper body was not available; each is tested):

* A task matrix is ``(m, n)``; its truncated SVD is returned as ``U (m, k)``, ``s (k,)``,
  ``V (n, k)`` (``V``, not ``V^T``), ``Delta ~ U diag(s) V^T``.
* Triplets whose singular value is numerically zero (``<= rtol * s_max`` of that matrix) carry no
  direction (any unit vector is a valid singular vector) and are dropped (zeroed): otherwise
  arbitrary vectors would enter the stacks and tilt the other tasks' directions in the polar step.
  Real task matrices are full rank, so this only matters for rank-deficient (synthetic) updates.
* The polar factor of a stack ``X = P S Q^T`` is ``P Q^T``; where ``X`` is rank deficient (e.g.
  identical tasks) the directions with ``S ~ 0`` are dropped, which gives the partial isometry
  (for full-rank stacks it is the polar factor exactly). With two identical tasks TSV-M then
  returns the task's own top-``k`` truncation, not an arbitrary completion.
* ``k`` is at least 1 (``floor(min(m, n) / T)`` is 0 only when there are more tasks than rows).

Speed. TSV-M is run again and again (coefficient sweeps, routing, evolution), so
:func:`tsv_merge_matrices` batches the per-task work of one layer and offers three solvers for the
per-task top-``k`` SVD (``svd=``):

* ``"gram"`` (the default, exact up to rounding): the top ``k`` eigenvectors of each task's
  ``(n, n)`` Gram matrix ``Delta^T Delta`` (``n`` the short side) in float64, then
  ``U = Delta V / s``: a symmetric eigenproblem of the short side instead of an SVD of the whole
  matrix. LAPACK's ``syevr`` computes only the ``k`` eigenvectors asked for; it is called without
  holding the GIL (:mod:`mergelab.lapack`) so that tasks overlap. The polar factors come from the
  stacks' ``(T k, T k)`` Gram matrices, ``X (X^T X)^{-1/2}``, where those are well conditioned
  (float32 for tall stacks, else float64), and from the float64 SVD otherwise. On the CPU every
  task runs single-threaded and tasks run side by side (see :func:`_cpu_map` for why), and a whole
  model's layers run side by side (:func:`_layers_side_by_side`); on a GPU the steps are batched
  torch calls. ``gram_dtype="float32"`` is faster on a CPU but less accurate: a
  float32 Gram matrix resolves the ``k``-th singular vector only to about
  ``1e-7 (s_1 / s_k)^2``, which the float64 Rayleigh-Ritz step cannot repair (relative error about
  ``1e-4`` at ``T = 8`` and ``2e-5`` at ``T = 20`` on ViT-B-32-shaped task vectors, but ``2e-3`` to
  ``4e-2`` at ``T = 2``, where ``k`` falls in the flat, noise-like part of the spectrum; ``make bench``;
  and 0.4 at ``T = 2``, 7e-2 at ``T = 4`` for ``(2304, 768)`` matrices with singular values
  ``exp(-i / 30)``, whose ``k``-th one is below float32's resolution). No a-priori estimate we tried
  separates the safe cases from these, so it stays an option.
* ``"exact"``: batched ``torch.linalg.svd`` of the ``(T, m, n)`` stack, truncated;
* ``"randomized"``: subspace iteration (Halko et al., 2011) with ``oversample`` extra columns and
  ``n_iter`` power iterations; approximate where the spectrum decays slowly, as task matrices'
  spectra do (``benchmarks/bench_tsv.py`` measures how far off it is).

:func:`tsv_merge_matrix_reference` is the plain per-task, per-layer version (one full SVD per task,
polar factors by SVD) that the others are tested and benchmarked against.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from . import lapack
from .evaluation import merge_baselines
from .merging import (LayerUpdate, _scaled, _validate, absolute_accuracy, merge, normalized_accuracy,
                      register_merge)
from .task_vectors import TaskVector
from .utils import StateDict, pick_device, torch_threads

SVD_METHODS = ("gram", "exact", "randomized")
"""Solvers for the per-task truncated SVD in :func:`truncated_svd`."""

POLAR_METHODS = ("gram", "svd")
"""Ways to compute the polar factor in :func:`polar_factor`."""

LAYER_KINDS = ("attn_in_proj", "attn_out_proj", "mlp_c_fc", "mlp_c_proj", "positional_embedding", "proj",
               "conv1", "text_projection", "other")
"""Layer kinds of open_clip's vision transformer (see :func:`layer_kind`)."""

DECOMPOSED_KINDS = ("attn_in_proj", "attn_out_proj", "mlp_c_fc", "mlp_c_proj", "positional_embedding", "proj")
"""Kinds that TSV decomposes (2-D). ``conv1`` (4-D), ``text_projection`` and ``other`` are averaged."""

RTOL = 1e-6
"""Singular values ``<= RTOL * s_max`` of their matrix are treated as zero (no direction)."""

RTOL_GRAM32 = 1e-3
"""The same cut-off when the Gram matrix is formed in float32: its eigenvalues carry an absolute
error of about ``1e-7 * s_max^2``, so singular values below ``~3e-4 * s_max`` are not resolved."""


# ----------------------------------------------------------------------------- which tensors
def layer_kind(name: str, shape: Sequence[int] | torch.Size | None = None) -> str:
    """The kind of an open_clip vision-transformer parameter, from its name (and shape).

    Returns one of :data:`LAYER_KINDS`: ``attn_in_proj`` (``(3 d, d)``), ``attn_out_proj`` (``(d, d)``),
    ``mlp_c_fc`` (``(4 d, d)``), ``mlp_c_proj`` (``(d, 4 d)``), ``positional_embedding``
    (``(tokens, d)``), ``proj`` (the visual projection ``(d, d_embed)``), ``conv1`` (the 4-D patch
    stem), ``text_projection``, or ``other`` (biases, LayerNorm, class embedding, anything else; a
    2-D tensor of another name is ``other`` but still decomposed, see :func:`is_decomposed`).
    """
    leaf = name.split(".")
    if "text_projection" in name:
        return "text_projection"
    if name.endswith("attn.in_proj_weight"):
        return "attn_in_proj"
    if name.endswith("attn.out_proj.weight"):
        return "attn_out_proj"
    if name.endswith("mlp.c_fc.weight"):
        return "mlp_c_fc"
    if name.endswith("mlp.c_proj.weight"):
        return "mlp_c_proj"
    if leaf[-1] == "positional_embedding":
        return "positional_embedding"
    if leaf[-1] == "proj" and (shape is None or len(shape) == 2):
        return "proj"
    if name.endswith("conv1.weight"):
        return "conv1"
    return "other"


def layer_order(names: Iterable[str]) -> list[str]:
    """Parameter names from input to output: stem and ``positional_embedding``, then the residual
    blocks in depth order (their own order kept within a block), then ``ln_post`` and ``proj``."""
    names = list(names)

    def depth(item: tuple[int, str]) -> tuple[float, int]:
        i, name = item
        parts = name.split(".")
        if "resblocks" in parts:
            return float(parts[parts.index("resblocks") + 1]), i
        if parts[0] in ("ln_post", "proj", "text_projection"):
            return math.inf, i
        return -1.0, i

    return [name for _, name in sorted(enumerate(names), key=depth)]


def is_decomposed(name: str, tensor: torch.Tensor) -> bool:
    """Whether TSV decomposes this parameter: every 2-D tensor except ``text_projection``."""
    return tensor.ndim == 2 and "text_projection" not in name


def default_rank(shape: Sequence[int], num_tasks: int | None = None, rank_fraction: float | None = None) -> int:
    """Triplets kept per task for an ``(m, n)`` matrix.

    ``floor(min(m, n) / num_tasks)`` (the TSV default) or ``floor(min(m, n) * rank_fraction)``, at
    least 1 and at most ``min(m, n)``.
    """
    if len(shape) != 2:
        raise ValueError(f"shape={tuple(shape)!r} is not a matrix shape; TSV decomposes 2-D tensors only.")
    full = min(int(shape[0]), int(shape[1]))
    if rank_fraction is not None:
        if not 0 < rank_fraction <= 1:
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
    called through :mod:`mergelab.lapack`, release the GIL and run in parallel.
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
    the GIL so that calls from several threads run side by side (:mod:`mergelab.lapack`).
    """
    if k < g.shape[0]:
        return lapack.eigh_top(g, k, overwrite=True)
    return lapack.eigh_all(g, overwrite=True)


def _np_task_svd(a: np.ndarray, k: int, f64: bool, rtol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` SVD of one tall ``(m, n)`` matrix from its Gram matrix (float64 results; see
    :func:`_gram_svd`)."""
    n = a.shape[1]
    a64 = a.astype(np.float64, copy=False)
    if f64:
        w, v = _np_eigh_top(_np_gram(a64), k)
        b = a64 @ v
    else:
        p = min(n - k, max(8, k // 4))
        _, v32 = _np_eigh_top(_np_gram(a.astype(np.float32, copy=False)), k + p)
        v64 = v32.astype(np.float64)
        b = a64 @ v64
        w, rot = _np_eigh_top(_np_gram(b), k)
        v, b = v64 @ rot, b @ rot
    s = np.sqrt(np.clip(w, 0, None))
    good = s > rtol * max(float(s[0]), 1e-300)
    return b / np.where(good, s, 1.0), s, v


def _np_polar(x: np.ndarray, rtol: float, gram: bool) -> np.ndarray:
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
    keep = (sv > rtol * max(float(sv[0]), 1e-300)).astype(p.dtype)
    return ((p * keep) @ qh).astype(x.dtype, copy=False)


# ----------------------------------------------------------------------------- torch kernels (GPU)
def _torch_eigh_top(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (decreasing) of a batch of symmetric matrices with ``torch.linalg.eigh``."""
    w, v = torch.linalg.eigh(g)
    return w.flip(-1)[..., :k], v.flip(-1)[..., :k]


def _torch_task_svd(A: torch.Tensor, k: int, f64: bool, rtol: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_np_task_svd` batched over ``(T, m, n)`` with torch (used on GPUs; float64 results)."""
    n = A.shape[-1]
    A64 = A.double()
    if f64:
        w, V = _torch_eigh_top(A64.transpose(-2, -1) @ A64, k)
        B = A64 @ V
    else:
        A32 = A.float()
        p = min(n - k, max(8, k // 4))
        _, V32 = _torch_eigh_top(A32.transpose(-2, -1) @ A32, k + p)
        V64 = V32.double()
        B = A64 @ V64
        w, rot = _torch_eigh_top(B.transpose(-2, -1) @ B, k)
        V, B = V64 @ rot, B @ rot
    s = w.clamp_min(0).sqrt()
    good = s > rtol * s[..., :1].clamp_min(1e-300)
    return B / torch.where(good, s, torch.ones_like(s)).unsqueeze(-2), s, V


def _torch_polar(X: torch.Tensor, rtol: float, gram: bool) -> torch.Tensor:
    """:func:`_np_polar` for ``(..., m, r)`` with torch (used on GPUs)."""
    for dtype in (torch.float32, torch.float64) if gram else ():
        Xg = X.to(dtype)
        w, Q = torch.linalg.eigh(Xg.transpose(-2, -1) @ Xg)
        if bool(((w[..., 0] >= POLAR_GRAM_MIN_RATIO[dtype] * w[..., -1]) & (w[..., -1] > 0)).all()):
            return (Xg @ ((Q * w.rsqrt().unsqueeze(-2)) @ Q.transpose(-2, -1))).to(X.dtype)
    P, S, Qh = torch.linalg.svd(X.double(), full_matrices=False)
    keep = (S > rtol * S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)).to(P.dtype).unsqueeze(-2)
    return ((P * keep) @ Qh).to(X.dtype)


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
    if A.device.type == "cpu" and A.shape[-1] >= SMALL:
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


# ----------------------------------------------------------------------------- polar factor
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


def polar_factor(X: torch.Tensor, method: str = "svd", rtol: float = RTOL) -> torch.Tensor:
    """The polar factor of ``X (..., m, r)``, ``m >= r``: with ``X = P S Q^T`` (thin SVD), ``P Q^T``.

    The closest matrix to ``X`` with orthonormal columns (in Frobenius norm). Directions with
    ``S <= rtol * S_max`` are dropped, so a rank-deficient ``X`` gives the partial isometry on its
    range (zero columns stay zero).

    Args:
        X: ``(m, r)`` or ``(..., m, r)``.
        method: ``"svd"``, or ``"gram"``: ``X (X^T X)^{-1/2}`` from the eigendecomposition of the
            ``(r, r)`` Gram matrix (the same matrix, cheaper when ``m > r``), used only where the
            Gram matrix is well conditioned (:data:`POLAR_GRAM_MIN_RATIO`, and on the CPU
            :data:`POLAR_GRAM_MIN_ASPECT`), else the SVD.
        rtol: relative cut-off on the singular values of ``X``.

    The SVD (and the Gram matrices' final fallback) run in float64; the result has ``X``'s dtype.
    """
    return polar_factors([X], method, rtol)[0]


def polar_factors(Xs: Sequence[torch.Tensor], method: str = "svd", rtol: float = RTOL) -> list[torch.Tensor]:
    """:func:`polar_factor` of several matrices; on the CPU they are computed side by side."""
    _check_choice("method", method, POLAR_METHODS)
    gram = method == "gram"
    out: list[torch.Tensor | None] = [None] * len(Xs)
    cpu = [i for i, X in enumerate(Xs) if X.device.type == "cpu" and X.shape[-1] >= SMALL]
    if cpu:
        items = [(i, x) for i in cpu for x in _to_numpy(Xs[i])]
        polars = _cpu_map(lambda item: _np_polar(item[1], rtol, gram), items)
        for i in cpu:
            mats = [P for (j, _), P in zip(items, polars) if j == i]
            out[i] = torch.from_numpy(np.stack(mats)).reshape(Xs[i].shape).to(Xs[i].dtype)
    for i, X in enumerate(Xs):
        if out[i] is None:
            out[i] = _torch_polar(X, rtol, gram)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- TSV-M on one layer
@dataclass
class MergedFactors:
    """The TSV-M update of one layer in factored form: ``update = U @ diag(s) @ V.T``.

    Attributes:
        U: ``(m, r)`` with orthonormal columns (zero columns for dropped triplets), ``r = T k``.
        s: ``(r,)`` the tasks' kept singular values, unchanged, task after task.
        V: ``(n, r)`` with orthonormal columns.
        k: triplets kept per task.
    """

    U: torch.Tensor
    s: torch.Tensor
    V: torch.Tensor
    k: int

    def update(self) -> torch.Tensor:
        """``U diag(s) V^T``, ``(m, n)``."""
        return (self.U * self.s) @ self.V.T


def _stack_kept(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T, m, k), (T, k), (T, n, k) -> (m, T k), (T k,), (n, T k)``: task blocks side by side."""
    T, m, k = U.shape
    n = V.shape[1]
    return U.permute(1, 0, 2).reshape(m, T * k), s.reshape(T * k), V.permute(1, 0, 2).reshape(n, T * k)


def tsv_merge_factors(task_matrices: torch.Tensor | Sequence[torch.Tensor], k: int | None = None,
                      svd: str = "gram", polar: str | None = None, gram_dtype: torch.dtype | str = "float64",
                      **svd_options) -> MergedFactors:
    """TSV-M on one layer, in factored form.

    Args:
        task_matrices: ``(T, m, n)`` stack (or a list of ``(m, n)``) of the tasks' updates.
        k: triplets per task (default ``floor(min(m, n) / T)``, at least 1).
        svd: per-task solver, see :func:`truncated_svd`.
        polar: ``"svd"`` or ``"gram"`` (default: ``"svd"`` with the ``"exact"`` solver, else ``"gram"``).
        gram_dtype: precision of the Gram matrices, ``"float64"`` or ``"float32"`` (see
            :func:`truncated_svd` and :func:`polar_factor`).
        svd_options: ``oversample``, ``n_iter``, ``rtol``, ``seed`` for :func:`truncated_svd`.

    Returns:
        :class:`MergedFactors` with orthonormal ``U``, ``V`` and the unchanged singular values.
    """
    stack = task_matrices if isinstance(task_matrices, torch.Tensor) else torch.stack(list(task_matrices))
    if stack.ndim != 3:
        raise ValueError(f"task_matrices has shape {tuple(stack.shape)}; pass (T, m, n) or a list of (m, n).")
    T = stack.shape[0]
    k = default_rank(stack.shape[1:], T) if k is None else _check_rank(k, stack.shape)
    polar = polar or ("svd" if svd == "exact" else "gram")
    U, s, V = truncated_svd(stack, k, svd=svd, gram_dtype=gram_dtype, **svd_options)
    U, s, V = _stack_kept(U, s, V)
    U_perp, V_perp = polar_factors([U, V], polar)
    return MergedFactors(U_perp, s, V_perp, k)


def tsv_merge_matrices(task_matrices: torch.Tensor | Sequence[torch.Tensor], k: int | None = None,
                       svd: str = "gram", polar: str | None = None, gram_dtype: torch.dtype | str = "float64",
                       **svd_options) -> torch.Tensor:
    """TSV-M update of one layer, ``(m, n)`` (coefficient 1): ``U_perp diag(s) V_perp^T``.

    Same arguments as :func:`tsv_merge_factors`. With one task and ``k = min(m, n)`` it returns the
    task matrix itself; with mutually orthogonal tasks of rank ``<= k`` it returns their sum.
    """
    return tsv_merge_factors(task_matrices, k, svd=svd, polar=polar, gram_dtype=gram_dtype,
                             **svd_options).update()


def tsv_merge_matrix_reference(task_matrices: Sequence[torch.Tensor], k: int | None = None,
                               rtol: float = RTOL) -> torch.Tensor:
    """The plain per-task version of :func:`tsv_merge_matrices` (what the fast paths are checked against).

    One full ``torch.linalg.svd`` per task, truncation to the top ``k``, the stacks assembled column
    block by column block, polar factors by SVD. Same conventions (zero triplets dropped, partial
    isometry) as the fast paths.
    """
    mats = list(task_matrices)
    T = len(mats)
    m, n = mats[0].shape
    k = default_rank((m, n), T) if k is None else _check_rank(k, (m, n))
    U_stack = torch.zeros(m, T * k, dtype=mats[0].dtype, device=mats[0].device)
    V_stack = torch.zeros(n, T * k, dtype=mats[0].dtype, device=mats[0].device)
    s_stack = torch.zeros(T * k, dtype=mats[0].dtype, device=mats[0].device)
    for t, A in enumerate(mats):
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = s[:k] > rtol * s[0].clamp_min(torch.finfo(s.dtype).tiny)
        U_stack[:, t * k:(t + 1) * k] = U[:, :k] * keep
        V_stack[:, t * k:(t + 1) * k] = Vh[:k].T * keep
        s_stack[t * k:(t + 1) * k] = s[:k] * keep

    def polar(X: torch.Tensor) -> torch.Tensor:
        P, S, Qh = torch.linalg.svd(X, full_matrices=False)
        return (P * (S > rtol * S[0]).to(P.dtype)) @ Qh

    return (polar(U_stack) * s_stack) @ polar(V_stack).T


# ----------------------------------------------------------------------------- TSV-M on state dicts
def tsv_update(task_vectors: Sequence[TaskVector], rank_fraction: float | None = None, svd: str = "gram",
               polar: str | None = None, device: str | torch.device | None = "auto",
               **svd_options) -> dict[str, torch.Tensor]:
    """The TSV-M merged task vector (coefficient 1), one tensor at a time.

    2-D tensors (except ``text_projection``) go through :func:`tsv_merge_matrices` with
    ``k = floor(min(m, n) / T)`` (or ``floor(min(m, n) * rank_fraction)``); every other tensor is the
    mean over tasks. Work runs on ``device`` (``"auto"``: the GPU when there is one); results are
    returned on the task vectors' device. On the CPU the 2-D layers are merged side by side, one
    single-threaded layer per thread (:func:`_layers_side_by_side`); the result is the same.
    """
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty; pass at least one TaskVector to merge.")
    dev = pick_device(device) if device is not None else None
    T = len(task_vectors)
    first = task_vectors[0]

    def stacked(key: str) -> tuple[torch.Tensor, torch.device]:
        stack = torch.stack([tv[key] for tv in task_vectors])
        return (stack.to(dev) if dev is not None else stack), stack.device

    def merge_layer(key: str) -> torch.Tensor:
        work, home = stacked(key)
        k = default_rank(first[key].shape, T, rank_fraction)
        return tsv_merge_matrices(work.float(), k, svd=svd, polar=polar, **svd_options).to(home)

    decomposed = [key for key, ref in first.items() if is_decomposed(key, ref)]
    where = dev if dev is not None else (first[decomposed[0]].device if decomposed else None)
    if where is not None and where.type == "cpu" and _cpu_workers(len(decomposed)) > 1:
        merged = _layers_side_by_side(merge_layer, decomposed)
    else:
        merged = {key: merge_layer(key) for key in decomposed}
    out: dict[str, torch.Tensor] = {}
    for key in first:
        if key in merged:
            out[key] = merged[key]
        else:
            work, home = stacked(key)
            out[key] = work.float().mean(0).to(home)
    return out


def _layers_side_by_side(fn, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{key: fn(key)}`` with the keys spread over ``torch.get_num_threads()`` threads, each call
    single-threaded (torch and BLAS limited to one thread meanwhile, then restored).

    Within one layer the tasks already run side by side (:func:`_cpu_map`), but every layer ends in
    steps that leave a core idle: two polar factors of unequal cost, then one product. Whole layers
    side by side keep both cores busy (about 12 % faster on ViT-B-32 with 8 tasks on 2 cores).
    """
    workers = _cpu_workers(len(keys))
    # one torch thread also makes _cpu_workers() 1 inside fn
    with torch_threads(1), _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        return dict(zip(keys, pool.map(fn, keys)))


def _tsv_layer_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                      **options) -> LayerUpdate:
    """:func:`tsv_update` in the registry's ``(keys, U_k)`` form (see :class:`mergelab.merging.MergeMethod`)."""
    _validate(pretrained, task_vectors)
    update = tsv_update(task_vectors, **options)
    return list(update), update.__getitem__


@register_merge("tsv_merge", coefficient_grid=np.round(np.arange(0.1, 3.01, 0.1), 2), update=_tsv_layer_update,
                coefficient=1.0)
def tsv_merge(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
              coefficient: float = 1.0, rank_fraction: float | None = None, svd: str = "gram",
              polar: str | None = None, device: str | torch.device | None = "auto", **svd_options
              ) -> StateDict:
    """TSV-M (Gargiulo et al., 2025): ``theta_0 + coefficient * tsv_update(task_vectors)``.

    Args:
        pretrained: the pretrained state dict ``theta_0``.
        task_vectors: ``T`` task vectors of the same architecture.
        coefficient: ``alpha``; 1 is the data-free default, the registered grid ``0.1..3.0`` is
            swept on validation by :func:`mergelab.merging.merge_with_validation`.
        rank_fraction: keep ``floor(min(m, n) * rank_fraction)`` triplets per task instead of
            ``floor(min(m, n) / T)``.
        svd, polar, svd_options: solver choices, see :func:`tsv_merge_factors`.
        device: where the SVDs run (``"auto"``: the GPU when there is one; ``None``: where the
            tensors are).
    """
    return _scaled(pretrained, _tsv_layer_update(pretrained, task_vectors, rank_fraction=rank_fraction, svd=svd,
                                                 polar=polar, device=device, **svd_options), coefficient)


# ----------------------------------------------------------------------------- TSV-C
@dataclass
class CompressedTaskVector:
    """A task vector with each decomposed matrix stored as its top-``k`` singular triplets.

    Attributes:
        factors: parameter name to ``(U (m, k), s (k,), V (n, k))``.
        dense: parameters stored in full (not decomposed: biases, LayerNorm, ``conv1``...).
        shapes: every parameter's shape, in the original key order.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes needed to store the compressed task vector (factors plus dense tensors)."""
        total = sum(t.numel() * t.element_size() for f in self.factors.values() for t in f)
        return total + sum(t.numel() * t.element_size() for t in self.dense.values())

    def ranks(self) -> dict[str, int]:
        """Triplets kept per decomposed parameter."""
        return {k: int(f[1].numel()) for k, f in self.factors.items()}

    def truncated(self, k: int | None = None, num_tasks: int | None = None,
                  rank_fraction: float | None = None) -> "CompressedTaskVector":
        """The same task vector keeping fewer triplets (the top ones of those stored), chosen as in
        :func:`tsv_compress`; no SVD is recomputed. Asking for more triplets than stored is an error."""
        _check_rank_choice(k, num_tasks, rank_fraction)
        factors = {}
        for name, (U, s, V) in self.factors.items():
            shape = self.shapes[name]
            kk = min(k, min(shape)) if k is not None else default_rank(shape, num_tasks, rank_fraction)
            if kk > s.numel():
                raise ValueError(f"{name!r} stores {s.numel()} triplets; {kk} were asked for. Compress with "
                                 "more triplets first.")
            factors[name] = (U[:, :kk].contiguous(), s[:kk].contiguous(), V[:, :kk].contiguous())
        return CompressedTaskVector(factors, dict(self.dense), dict(self.shapes))


def _check_rank_choice(k: int | None, num_tasks: int | None, rank_fraction: float | None) -> None:
    given = [x is not None for x in (k, num_tasks, rank_fraction)]
    if sum(given) != 1:
        raise ValueError(f"give exactly one of k={k!r}, num_tasks={num_tasks!r}, rank_fraction={rank_fraction!r}.")
    if k is not None and (not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k={k!r} is not valid; use a positive number of triplets per matrix.")


def tsv_compress(task_vector: TaskVector, k: int | None = None, num_tasks: int | None = None,
                 rank_fraction: float | None = None, svd: str = "gram", **svd_options) -> CompressedTaskVector:
    """TSV-C: keep each decomposed matrix's top singular triplets, every other tensor in full.

    Give exactly one of ``k`` (the same number of triplets for every matrix, capped at
    ``min(m, n)``), ``num_tasks`` (``k = floor(min(m, n) / T)``, the TSV default) or
    ``rank_fraction`` (``k = floor(min(m, n) * f)``). ``svd`` picks the solver
    (:func:`truncated_svd`).
    """
    _check_rank_choice(k, num_tasks, rank_fraction)
    factors, dense, shapes = {}, {}, {}
    for name, v in task_vector.items():
        shapes[name] = tuple(v.shape)
        if is_decomposed(name, v):
            kk = min(k, min(v.shape)) if k is not None else default_rank(v.shape, num_tasks, rank_fraction)
            U, s, V = truncated_svd(v.float(), kk, svd=svd, **svd_options)
            factors[name] = (U.contiguous(), s.contiguous(), V.contiguous())
        else:
            dense[name] = v.clone()
    return CompressedTaskVector(factors, dense, shapes)


def tsv_reconstruct(compressed: CompressedTaskVector) -> TaskVector:
    """The task vector TSV-C rebuilds: ``U diag(s) V^T`` per matrix, the dense tensors as stored."""
    out = {}
    for name in compressed.shapes:
        if name in compressed.factors:
            U, s, V = compressed.factors[name]
            out[name] = (U * s) @ V.T
        else:
            out[name] = compressed.dense[name].clone()
    return TaskVector(out)


def storage_bytes(task_vector: TaskVector | CompressedTaskVector) -> int:
    """Bytes to store a task vector (dense) or a compressed one."""
    if isinstance(task_vector, CompressedTaskVector):
        return task_vector.nbytes()
    return sum(v.numel() * v.element_size() for v in task_vector.vector.values())


# ----------------------------------------------------------------------------- spectra and energy
def singular_values(task_vector: TaskVector) -> dict[str, torch.Tensor]:
    """Singular values (non-increasing) of every decomposed matrix of a task vector."""
    return {k: torch.linalg.svdvals(v.float()) for k, v in task_vector.items() if is_decomposed(k, v)}


def cumulative_energy(s: torch.Tensor) -> torch.Tensor:
    """``E(r) = sum_{i <= r} s_i^2 / sum_i s_i^2`` for ``r = 1..len(s)``: the share of the squared
    Frobenius norm the top ``r`` triplets keep."""
    e = (s.double() ** 2).cumsum(0)
    return (e / e[-1].clamp_min(1e-300)).float()


def energy_at(s: torch.Tensor, k: int) -> float:
    """Share of the squared Frobenius norm in the top ``k`` triplets."""
    return float(cumulative_energy(s)[_check_rank(k, (len(s), len(s))) - 1])


def random_like(matrix: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian random matrix with the shape and Frobenius norm of ``matrix`` (a full-rank baseline)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(tuple(matrix.shape), generator=g)
    return R * (matrix.float().norm() / R.norm().clamp_min(1e-30))


@dataclass
class Spectra:
    """Singular values of every decomposed matrix, computed once for the spectrum analyses.

    Attributes:
        tasks: task name to ``{layer: s}`` (non-increasing, ``(min(m, n),)``).
        random: ``{layer: s}`` of a Gaussian matrix with that layer's shape and the first task's
            norm (:func:`random_like`, seeded ``seed + i`` for the ``i``-th decomposed layer).
    """

    tasks: dict[str, dict[str, torch.Tensor]]
    random: dict[str, torch.Tensor]


def spectra(task_vectors: Mapping[str, TaskVector], seed: int = 0) -> Spectra:
    """:class:`Spectra` of the task vectors (one full set of singular values per task and layer)."""
    first = next(iter(task_vectors.values()))
    random = {layer: torch.linalg.svdvals(random_like(v, seed + i))
              for i, (layer, v) in enumerate((k, v) for k, v in first.items() if is_decomposed(k, v))}
    return Spectra({task: singular_values(tv) for task, tv in task_vectors.items()}, random)


def spectrum_curves(task_vectors: Mapping[str, TaskVector], rank_fractions: Sequence[float] | None = None,
                    seed: int = 0, precomputed: Spectra | None = None) -> pd.DataFrame:
    """Normalized cumulative energy against rank fraction, per task and decomposed layer.

    Returns a tidy frame ``(task, layer, kind, source, rank_fraction, energy)`` where ``source`` is
    ``"task matrix"`` or ``"random"`` (a Gaussian matrix of the same shape and norm, one per layer).
    Rank fraction ``r / min(m, n)``; energy interpolated on ``rank_fractions`` (default 40 points).
    ``precomputed``: the :func:`spectra` of these task vectors, to avoid computing them again
    (``seed`` is then the one they were computed with).
    """
    grid = np.asarray(rank_fractions if rank_fractions is not None else np.linspace(0, 1, 41))
    spec = precomputed if precomputed is not None else spectra(task_vectors, seed)
    rows = []

    def add(task: str, layer: str, source: str, s: torch.Tensor) -> None:
        e = np.concatenate([[0.0], cumulative_energy(s).numpy()])
        x = np.arange(len(e)) / (len(e) - 1)
        for f, val in zip(grid, np.interp(grid, x, e)):
            rows.append({"task": task, "layer": layer, "kind": layer_kind(layer, None), "source": source,
                         "rank_fraction": float(f), "energy": float(val)})

    for layer, s in spec.random.items():
        add("random", layer, "random", s)
    for task, by_layer in spec.tasks.items():
        for layer, s in by_layer.items():
            add(task, layer, "task matrix", s)
    return pd.DataFrame(rows)


def energy_table(task_vectors: Mapping[str, TaskVector], num_tasks: int | None = None,
                 rank_fraction: float | None = None, precomputed: Spectra | None = None) -> pd.DataFrame:
    """Energy captured by the kept triplets, one row per (task, decomposed layer).

    Columns: ``task, layer, kind, shape, k, rank_fraction (k / min(m, n)), energy, stable_rank``
    (``||Delta||_F^2 / s_1^2``) and ``random_energy`` (same ``k`` on a random matrix of the same shape
    and norm). ``k`` as in :func:`default_rank` (default ``num_tasks = len(task_vectors)``).
    ``precomputed``: the :func:`spectra` of these task vectors, to avoid computing them again.
    """
    num_tasks = num_tasks if (num_tasks is not None or rank_fraction is not None) else len(task_vectors)
    spec = precomputed if precomputed is not None else spectra(task_vectors)
    rows = []
    for task, tv in task_vectors.items():
        for layer, s in spec.tasks[task].items():
            shape = tuple(tv[layer].shape)
            k = default_rank(shape, num_tasks, rank_fraction)
            rows.append({"task": task, "layer": layer, "kind": layer_kind(layer, shape), "shape": shape, "k": k,
                         "rank_fraction": k / min(shape), "energy": energy_at(s, k),
                         "stable_rank": float((s ** 2).sum() / s[0] ** 2),
                         "random_energy": energy_at(spec.random[layer], k)})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- interference
def singular_task_interference(task_matrices: torch.Tensor | Sequence[torch.Tensor], k: int | None = None,
                               normalized: bool = True, svd: str = "gram") -> float:
    """Singular Task Interference of ``T`` task matrices of one layer.

    ``STI = || (U^T U - I) Sigma (V^T V - I) ||_*`` where ``U = [U_1 ... U_T]`` (``(m, T k)``) and
    ``V`` stack every task's top-``k`` singular vectors, ``Sigma = diag(s_1, ..., s_T)`` is
    block-diagonal, and ``||.||_*`` is the **nuclear norm** (Schatten 1-norm: the sum of singular
    values). We use the nuclear norm because it makes the bounds below hold; the entrywise L1 norm
    does not (a rotated copy of a task would interfere *more* than the task itself).

    Properties (tested): ``STI = 0`` when the tasks' singular vectors are mutually orthogonal
    (``U^T U = V^T V = I``). For two tasks ``STI = ||U_1^T Delta_2 V_1||_* + ||U_2^T Delta_1 V_2||_*``
    (each task's update seen in the other's singular bases) and ``STI <= ||s_1||_1 + ||s_2||_1`` with
    equality for identical tasks. In general ``STI <= (T - 1)^2 ||Sigma||_*`` and ``T`` identical
    tasks give ``(T - 1) ||Sigma||_*``.

    Args:
        task_matrices: ``(T, m, n)`` or a list of ``(m, n)``, ``T >= 2``.
        k: triplets per task (default ``floor(min(m, n) / T)``).
        normalized: divide by ``(T - 1) * ||Sigma||_*``: 0 for orthogonal tasks, 1 for identical tasks;
            for two tasks it is always in ``[0, 1]``; scale-free.
        svd: solver for the per-task truncated SVD.
    """
    stack = task_matrices if isinstance(task_matrices, torch.Tensor) else torch.stack(list(task_matrices))
    T = stack.shape[0]
    if T < 2:
        raise ValueError(f"singular_task_interference needs at least 2 task matrices; got {T}.")
    k = default_rank(stack.shape[1:], T) if k is None else _check_rank(k, stack.shape)
    return _sti_of_factors(*truncated_svd(stack.float(), k, svd=svd), normalized=normalized)


def _sti_of_factors(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, normalized: bool = True) -> float:
    """:func:`singular_task_interference` from the tasks' truncated SVDs ``(T, m, k), (T, k), (T, n, k)``."""
    T = U.shape[0]
    U, s, V = (x.double() for x in _stack_kept(U, s, V))
    eye = torch.eye(U.shape[1], dtype=U.dtype, device=U.device)
    M = (U.T @ U - eye) @ torch.diag(s) @ (V.T @ V - eye)
    sti = float(torch.linalg.svdvals(M).sum())
    if not normalized:
        return sti
    total = float(s.sum())
    return sti / ((T - 1) * total) if total > 0 else 0.0


def _layer_factors(task_vectors: Mapping[str, TaskVector], num_tasks: int | None, layers: Iterable[str] | None,
                   svd: str, caller: str) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """``(layer, truncated SVDs of the tasks' matrices)`` per decomposed layer (or per layer in
    ``layers``), each task keeping ``k = floor(min(m, n) / num_tasks)`` triplets (default: all the
    tasks given). The shared loop of the interference analyses."""
    names = list(task_vectors)
    if len(names) < 2:
        raise ValueError(f"{caller} needs at least 2 task vectors; got {len(names)}.")
    first = task_vectors[names[0]]
    layers = list(layers) if layers is not None else [k for k, v in first.items() if is_decomposed(k, v)]
    for layer in layers:
        stack = torch.stack([task_vectors[t][layer].float() for t in names])
        yield layer, truncated_svd(stack, default_rank(stack.shape[1:], num_tasks or len(names)), svd=svd)


def pairwise_interference(task_vectors: Mapping[str, TaskVector], num_tasks: int | None = None,
                          layers: Iterable[str] | None = None, svd: str = "gram") -> dict[str, pd.DataFrame]:
    """Normalized two-task STI between every pair of tasks, per decomposed layer.

    Each task matrix keeps ``k = floor(min(m, n) / num_tasks)`` triplets (default: all the tasks
    given, i.e. the ``k`` TSV-M uses when merging them all). Returns ``{layer: (T, T) frame}``
    (diagonal 1: a task with itself). Each task's truncated SVD is computed once per layer.
    """
    names = list(task_vectors)
    return {layer: pd.DataFrame(_pairwise_sti_of_factors(*factors).numpy(), index=names, columns=names)
            for layer, factors in _layer_factors(task_vectors, num_tasks, layers, svd, "pairwise_interference")}


def _pairwise_sti_of_factors(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Normalized two-task STI of every pair ``(T, T)`` from the tasks' truncated SVDs
    ``(T, m, k), (T, k), (T, n, k)`` (see :func:`pairwise_interference`)."""
    U, s, V = U.double(), s.double(), V.double()
    # X[i, j] = U_i^T Delta_j V_i: task j's kept update in task i's singular bases (T, T, k, k)
    UU = torch.einsum("imk,jml->ijkl", U, U)
    VV = torch.einsum("jnl,inp->ijlp", V, V)
    X = UU * s[None, :, None, :] @ VV
    nuc = torch.linalg.svdvals(X).sum(-1)  # (T, T)
    norms = s.sum(-1)
    return (nuc + nuc.T) / (norms[:, None] + norms[None, :]).clamp_min(1e-300)


def interference_long(pairwise: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Tidy ``(layer, kind, task_a, task_b, sti)`` rows, one per layer and unordered pair of tasks,
    from :func:`pairwise_interference`."""
    rows = []
    for layer, frame in pairwise.items():
        names = list(frame.index)
        for a, b in itertools.combinations(names, 2):
            rows.append({"layer": layer, "kind": layer_kind(layer), "task_a": a, "task_b": b,
                         "sti": float(frame.loc[a, b])})
    return pd.DataFrame(rows)


def layer_interference(task_vectors: Mapping[str, TaskVector], svd: str = "gram") -> pd.Series:
    """Normalized STI of all the tasks together (:func:`singular_task_interference`), per decomposed layer."""
    return pd.Series({layer: _sti_of_factors(*factors)
                      for layer, factors in _layer_factors(task_vectors, None, None, svd, "layer_interference")},
                     name="sti")


@dataclass
class Interference:
    """Singular Task Interference per decomposed layer, with ``k = floor(min(m, n) / T)``.

    Attributes:
        pairwise: ``{layer: (T, T) frame}`` of normalized two-task STI (as :func:`pairwise_interference`).
        all_tasks: normalized STI of all the tasks together per layer (as :func:`layer_interference`).
    """

    pairwise: dict[str, pd.DataFrame]
    all_tasks: pd.Series


def interference(task_vectors: Mapping[str, TaskVector], svd: str = "gram") -> Interference:
    """:func:`pairwise_interference` and :func:`layer_interference` together, from one truncated SVD
    per task and layer instead of two."""
    names = list(task_vectors)
    pairwise, all_tasks = {}, {}
    for layer, factors in _layer_factors(task_vectors, None, None, svd, "interference"):
        pairwise[layer] = pd.DataFrame(_pairwise_sti_of_factors(*factors).numpy(), index=names, columns=names)
        all_tasks[layer] = _sti_of_factors(*factors)
    return Interference(pairwise, pd.Series(all_tasks, name="sti"))


# ----------------------------------------------------------------------------- experiments
def compressed_accuracy(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                        split: str = "test", compressed: Mapping[str, CompressedTaskVector] | None = None,
                        **compress_options) -> dict[str, object]:
    """TSV-C with the task known: each task's compressed task vector is added to ``theta_0`` and the
    model is evaluated on that task only.

    Args:
        benchmark: anything with ``evaluate(state, split, tasks) -> {task: accuracy}``.
        pretrained: ``theta_0``.
        task_vectors: task name to task vector.
        split: evaluation split.
        compressed: task name to an already compressed task vector (then ``compress_options`` is unused).
        compress_options: passed to :func:`tsv_compress` (``num_tasks``, ``rank_fraction`` or ``k``).

    Returns:
        ``{"per_task_accuracy", "compressed_bytes", "dense_bytes"}`` (bytes summed over tasks).
    """
    per_task, compressed_bytes, dense = {}, 0, 0
    for task, tv in task_vectors.items():
        c = compressed[task] if compressed is not None else tsv_compress(tv, **compress_options)
        compressed_bytes += c.nbytes()
        dense += storage_bytes(tv)
        state = tsv_reconstruct(c).apply_to(pretrained)
        per_task[task] = benchmark.evaluate(state, split=split, tasks=[task])[task]
    return {"per_task_accuracy": per_task, "compressed_bytes": compressed_bytes, "dense_bytes": dense}


def compression_sweep(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                      expert_accuracy: Mapping[str, float], rank_fractions: Sequence[float],
                      split: str = "test", svd: str = "gram") -> pd.DataFrame:
    """TSV-C accuracy (task known) and storage for each kept fraction of ``min(m, n)``.

    Each task vector is decomposed once, at the largest fraction, and truncated for the others
    (:meth:`CompressedTaskVector.truncated`). One row per fraction: ``rank_fraction,
    storage_fraction`` (compressed / dense bytes), ``compression_ratio`` (dense / compressed),
    ``absolute_accuracy``, ``normalized_accuracy`` (mean over tasks of accuracy / expert accuracy).
    """
    if len(rank_fractions) == 0:
        return pd.DataFrame(columns=["rank_fraction", "storage_fraction", "compression_ratio",
                                     "absolute_accuracy", "normalized_accuracy"])
    widest = {t: tsv_compress(tv, rank_fraction=float(max(rank_fractions)), svd=svd)
              for t, tv in task_vectors.items()}
    rows = []
    for f in rank_fractions:
        kept = {t: c.truncated(rank_fraction=float(f)) for t, c in widest.items()}
        r = compressed_accuracy(benchmark, pretrained, task_vectors, split, compressed=kept)
        acc = r["per_task_accuracy"]
        rows.append({"rank_fraction": float(f), "storage_fraction": r["compressed_bytes"] / r["dense_bytes"],
                     "compression_ratio": r["dense_bytes"] / r["compressed_bytes"],
                     "absolute_accuracy": absolute_accuracy(acc),
                     "normalized_accuracy": normalized_accuracy(acc, expert_accuracy)})
    return pd.DataFrame(rows)


def pairwise_merge_accuracy(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                            expert_accuracy: Mapping[str, float], method: str = "task_arithmetic",
                            split: str = "test", **options) -> pd.DataFrame:
    """Merge every pair of tasks with ``method`` and evaluate on those two tasks.

    One row per unordered pair: ``task_a, task_b, accuracy_a, accuracy_b, normalized_accuracy``
    (mean of the two accuracy / expert ratios) and ``normalized_loss = 1 - normalized_accuracy``.
    """
    rows = []
    for a, b in itertools.combinations(list(task_vectors), 2):
        state = merge(method, pretrained, [task_vectors[a], task_vectors[b]], **options)
        acc = benchmark.evaluate(state, split=split, tasks=[a, b])
        norm = normalized_accuracy(acc, expert_accuracy)
        rows.append({"task_a": a, "task_b": b, "accuracy_a": acc[a], "accuracy_b": acc[b],
                     "normalized_accuracy": norm, "normalized_loss": 1 - norm})
    return pd.DataFrame(rows)


def task_count_study(benchmark, pretrained: StateDict, task_vectors: Mapping[str, TaskVector],
                     expert_accuracy: Mapping[str, float], methods: Mapping[str, Mapping[str, object]],
                     task_counts: Sequence[int], subsets: int = 1, seed: int = 0) -> pd.DataFrame:
    """Accuracy of merging ``n`` tasks, for each ``n`` in ``task_counts`` and each method.

    Args:
        methods: registered method name to its options; a ``"grid"`` entry makes the coefficient
            be chosen on the validation split of the merged tasks
            (:func:`mergelab.evaluation.merge_baselines`), otherwise the method merges once.
        task_counts: numbers of tasks, each in ``1..len(task_vectors)``.
        subsets: random subsets of tasks drawn (seeded) per count (one when ``n`` is all tasks).

    Returns:
        One row per (count, subset, method): ``num_tasks, tasks, method, coefficient,
        absolute_accuracy, normalized_accuracy`` (test split).
    """
    names = list(task_vectors)
    bad = [n for n in task_counts if not 1 <= int(n) <= len(names)]
    if bad:
        raise ValueError(f"task_counts contains {bad[0]!r}; use numbers of tasks in 1..{len(names)}.")
    rng = np.random.default_rng(seed)
    options = {m: {"grid": (), **o} for m, o in methods.items()}  # no "grid": one merge with the options
    rows = []
    for n in task_counts:
        draws = 1 if n == len(names) else subsets
        for _ in range(draws):
            chosen = [names[i] for i in sorted(rng.choice(len(names), size=int(n), replace=False))]
            merged = merge_baselines(benchmark, pretrained, {t: task_vectors[t] for t in chosen}, list(methods),
                                     options=options, progress=False)
            for method, result in merged.items():
                acc = benchmark.evaluate(result.state, split="test", tasks=chosen)
                coefficient = result.coefficient if result.sweep else methods[method].get("coefficient")
                rows.append({"num_tasks": int(n), "tasks": ",".join(chosen), "method": method,
                             "coefficient": coefficient, "absolute_accuracy": absolute_accuracy(acc),
                             "normalized_accuracy": normalized_accuracy(acc, expert_accuracy)})
    return pd.DataFrame(rows)


def compare_with_reference(task_vectors: Sequence[TaskVector], **options) -> dict[str, float]:
    """Time :func:`tsv_merge_matrices` against :func:`tsv_merge_matrix_reference` on every
    decomposed layer of real task vectors; ``{"reference_s", "fast_s", "speedup",
    "relative_difference"}`` (Frobenius norm over all layers). ``benchmarks/bench_tsv.py`` does the
    same at ViT-B-32 size."""
    import time

    ref_s = fast_s = diff = total = 0.0
    for key, v in task_vectors[0].items():
        if not is_decomposed(key, v):
            continue
        stack = torch.stack([tv[key].float() for tv in task_vectors])
        start = time.perf_counter()
        ref = tsv_merge_matrix_reference(list(stack))
        ref_s += time.perf_counter() - start
        start = time.perf_counter()
        fast = tsv_merge_matrices(stack, **options)
        fast_s += time.perf_counter() - start
        diff += float((fast.double() - ref.double()).pow(2).sum())
        total += float(ref.double().pow(2).sum())
    return {"reference_s": ref_s, "fast_s": fast_s, "speedup": ref_s / fast_s if fast_s else float("nan"),
            "relative_difference": (diff / total) ** 0.5 if total else 0.0}
