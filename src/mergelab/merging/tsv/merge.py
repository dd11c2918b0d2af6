"""TSV-M and TSV-C's shared conventions, and how TSV-M is made fast (Gargiulo et al., CVPR 2025).

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
stem) is averaged over tasks by TSV-M and stored in full by TSV-C. See :func:`mergelab.layers.layer_kind`.

Conventions and choices made here (the paper body was not available; each is tested):

* A task matrix is ``(m, n)``; its truncated SVD is returned as ``U (m, k)``, ``s (k,)``,
  ``V (n, k)`` (``V``, not ``V^T``), ``Delta ~ U diag(s) V^T``.
* Triplets whose singular value is numerically zero (``<= rtol * s_max`` of that matrix) carry no
  direction (any unit vector is a valid singular vector) and are dropped (zeroed): otherwise
  arbitrary vectors would enter the stacks and tilt the other tasks' directions in the polar step.
  Real task matrices are full rank, so this only matters for rank-deficient (synthetic) updates.
* The polar factor of a stack ``X = P S Q^T`` is ``P Q^T``; where ``X`` is rank deficient (e.g.
  identical tasks) the directions with ``S`` zero to rounding (``<= max(m, r) eps(float64) S_max``)
  are dropped, which gives the partial isometry. Every other direction is kept, however weak, as
  the official code's plain SVD keeps it: square stacks (``T k = min(m, n)``, e.g. ViT-B-32's
  ``768 x 768`` matrices with 8 tasks) are often nearly dependent (smallest singular value ``1e-7``
  of the largest), and dropping that direction changed whole-model merges by ``1e-2`` relative (measured by the science review on ViT-B-32-shaped task vectors). With two identical tasks TSV-M then
  returns the task's own top-``k`` truncation, not an arbitrary completion.
* ``k`` is at least 1 (``floor(min(m, n) / T)`` is 0 only when there are more tasks than rows).

Speed. TSV-M is run again and again (coefficient sweeps, routing, evolution), so
:func:`tsv_merge_matrices` batches the per-task work of one layer and offers three solvers for the
per-task top-``k`` SVD (``svd=``):

* ``"gram"`` (the default, exact up to rounding): the top ``k`` eigenvectors of each task's
  ``(n, n)`` Gram matrix ``Delta^T Delta`` (``n`` the short side) in float64, then
  ``U = Delta V / s``: a symmetric eigenproblem of the short side instead of an SVD of the whole
  matrix. LAPACK's ``syevr`` computes only the ``k`` eigenvectors asked for; it is called without
  holding the GIL (:mod:`mergelab.linalg._lapack`) so that tasks overlap. The polar factors come from the
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
  spectra do (``perf/bench_tsv.py`` measures how far off it is).

:func:`tsv_merge_matrix_reference` is the plain per-task, per-layer version (one full SVD per task,
polar factors by SVD) that the others are tested and benchmarked against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ...layers import is_decomposed
from ...linalg import POLAR_METHODS, RTOL, default_rank, polar_factors, stack_kept, truncated_svd
from ...linalg import _kernels
from ...linalg._kernels import _blas_controller, _check_rank
from ...task_vectors import TaskVector
from ...utils import StateDict, pick_device, torch_threads
from ..base import LayerUpdate, scaled, validate
from ..registry import register_merge
from .compress import CompressedTaskVector


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
    check_polar(polar)
    polar = polar or ("svd" if svd == "exact" else "gram")
    U, s, V = truncated_svd(stack, k, svd=svd, gram_dtype=gram_dtype, **svd_options)
    U, s, V = stack_kept(U, s, V)
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
    block by column block, polar factors by a plain SVD of the stack as in the official code. Same
    conventions as the fast paths: a task's triplets with ``s <= rtol * s_max`` are dropped, and a
    stack's directions only where they are null to rounding (:func:`mergelab.linalg.polar_factor`).
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
        P, S, Qh = torch.linalg.svd(X.double(), full_matrices=False)
        tol = max(X.shape) * torch.finfo(torch.float64).eps
        return ((P * (S > tol * S[0]).to(P.dtype)) @ Qh).to(X.dtype)

    return (polar(U_stack) * s_stack) @ polar(V_stack).T


# ----------------------------------------------------------------------------- TSV-M on state dicts
SVD_OPTIONS = ("gram_dtype", "rtol", "oversample", "n_iter", "seed")
"""Solver options that TSV-M passes on to :func:`mergelab.linalg.truncated_svd`."""


def check_polar(polar: str | None) -> None:
    """Refuse a ``polar`` solver that :func:`mergelab.linalg.polar_factors` does not have, naming ``polar``."""
    if polar is not None and polar not in POLAR_METHODS:
        raise ValueError(f"polar={polar!r} is not valid; use one of {', '.join(POLAR_METHODS)} (or None: 'svd' with "
                         "the exact SVD, else 'gram').")


def check_svd_options(svd_options: Mapping[str, object]) -> None:
    """Refuse an option TSV-M would otherwise pass on to the solver, naming the valid ones."""
    unknown = sorted(set(svd_options) - set(SVD_OPTIONS))
    if unknown:
        raise ValueError(f"tsv_merge has no option {unknown[0]!r}; valid: coefficient, rank_fraction, svd, polar, "
                         f"device, {', '.join(SVD_OPTIONS)}.")


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
    check_svd_options(svd_options)
    check_polar(polar)
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
    if where is not None and where.type == "cpu" and _kernels._cpu_workers(len(decomposed)) > 1:
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
    workers = _kernels._cpu_workers(len(keys))
    # one torch thread also makes _cpu_workers() 1 inside fn
    with torch_threads(1), _blas_controller().limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        return dict(zip(keys, pool.map(fn, keys)))


def tsv_merge_compressed(compressed: Sequence[CompressedTaskVector], polar: str = "gram",
                         device: str | torch.device | None = None) -> TaskVector:
    """TSV-M (coefficient 1) from stored TSV-C factors, with the rank as stored (no SVD recomputed).

    What MASS does for its first pass (all ``T`` tasks) and for every second pass (the selected
    tasks, each keeping the ``floor(min(m, n) / T)`` triplets it was stored with, not the rank a
    merge of fewer tasks would pick). Per decomposed matrix the tasks' ``U (m, k)``, ``s (k,)`` and
    ``V (n, k)`` are stacked side by side and ``U``, ``V`` replaced by their polar factors (the same
    steps as :func:`tsv_merge_factors` after its SVDs); every other tensor is the mean over tasks (a task that left
    it unchanged counts with zeros).
    With one task the result is that task's TSV-C reconstruction (its vectors are already orthonormal).

    Args:
        compressed: the tasks' :class:`CompressedTaskVector` (same architecture, same ranks).
        polar: ``"gram"`` or ``"svd"`` (see :func:`mergelab.linalg.polar_factor`).
        device: where the polar factors are computed (``None``: where the factors are); the result
            is returned on the factors' device.
    """
    if len(compressed) == 0:
        raise ValueError("compressed is empty; pass at least one CompressedTaskVector to merge.")
    check_polar(polar)
    first = compressed[0]
    for i, c in enumerate(compressed[1:], 1):
        if c.shapes != first.shapes:
            key = next(k for k in sorted(set(first.shapes) | set(c.shapes)) if first.shapes.get(k) != c.shapes.get(k))
            raise ValueError(f"compressed task {i} differs from task 0 at {key!r} (shape {c.shapes.get(key)} against "
                             f"{first.shapes.get(key)}; None: missing): merge task vectors of one architecture.")
    out: dict[str, torch.Tensor] = {}
    for name in first.shapes:
        if name in first.factors:
            ranks = {c.factors[name][1].numel() for c in compressed}
            if len(ranks) != 1:
                raise ValueError(f"{name!r} is stored with different ranks {sorted(ranks)} across tasks; compress "
                                 "every task with the same num_tasks (or k) to merge their factors.")
            home = first.factors[name][0].device
            U, s, V = (torch.stack([c.factors[name][i] for c in compressed]).float() for i in range(3))
            if device is not None:
                U, s, V = U.to(device), s.to(device), V.to(device)
            U, s, V = stack_kept(U, s, V)
            U_perp, V_perp = polar_factors([U, V], polar)
            out[name] = ((U_perp * s) @ V_perp.T).to(home)
        else:
            out[name] = torch.stack([c.dense_tensor(name).float() for c in compressed]).mean(0)
    return TaskVector(out)


def _tsv_layer_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                      **options) -> LayerUpdate:
    """:func:`tsv_update` in the registry's ``(keys, U_k)`` form (see :class:`mergelab.merging.MergeMethod`)."""
    validate(pretrained, task_vectors)
    update = tsv_update(task_vectors, **options)
    return list(update), update.__getitem__


@register_merge("tsv_merge", coefficient_grid=np.round(np.arange(0.0, 3.01, 0.1), 2), update=_tsv_layer_update,
                pretty_name="TSV-M", reference="gargiulo2025tsv",
                identity={"coefficient": 1.0}, streams=False)
def tsv_merge(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
              coefficient: float = 1.0, rank_fraction: float | None = None, svd: str = "gram",
              polar: str | None = None, device: str | torch.device | None = "auto", **svd_options
              ) -> StateDict:
    """TSV-M (Gargiulo et al., 2025): ``theta_0 + coefficient * tsv_update(task_vectors)``.

    Args:
        pretrained: the pretrained state dict ``theta_0``.
        task_vectors: ``T`` task vectors of the same architecture.
        coefficient: ``alpha``; 1 is the data-free default, the registered grid ``0..3.0`` (0: the pretrained model) is
            swept on validation by :func:`mergelab.merging.merge_with_validation`.
        rank_fraction: keep ``floor(min(m, n) * rank_fraction)`` triplets per task instead of
            ``floor(min(m, n) / T)``.
        svd, polar, svd_options: solver choices, see :func:`tsv_merge_factors`.
        device: where the SVDs run (``"auto"``: the GPU when there is one; ``None``: where the
            tensors are).

    Memory: not streaming. The 2-D layers are merged side by side (:func:`tsv_update`) and the whole
    update is held before it is added, so the extra peak is about two models plus the stacks of the
    layers in flight (``perf/README.md`` measures it on ViT-B-32).
    """
    return scaled(pretrained, _tsv_layer_update(pretrained, task_vectors, rank_fraction=rank_fraction, svd=svd,
                                                 polar=polar, device=device, **svd_options), coefficient)
