"""Singular Task Interference (STI): how much the tasks' kept singular vectors overlap, per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from ..layers import is_decomposed, layer_kind
from ..linalg import default_rank, stack_kept, truncated_svd
from ..linalg._kernels import _check_rank
from ..task_vectors import TaskVector


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
    U, s, V = (x.double() for x in stack_kept(U, s, V))
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
