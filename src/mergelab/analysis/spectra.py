"""Singular-value spectra of task matrices and the energy their top triplets keep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..layers import is_decomposed, layer_kind
from ..linalg import default_rank
from ..linalg._kernels import _check_rank
from ..task_vectors import TaskVector
from ..utils import check_number


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
    if rank_fractions is not None:
        if isinstance(rank_fractions, (str, bytes)) or np.ndim(rank_fractions) != 1 or len(rank_fractions) == 0:
            raise ValueError(f"rank_fractions={rank_fractions!r} is not valid; give a non-empty list of fractions in "
                             "[0, 1] (rank r / min(m, n)), e.g. [0.0, 0.25, 0.5, 1.0].")
        for f in rank_fractions:
            check_number("rank_fractions value", f, low=0, high=1)
    grid = np.asarray(rank_fractions if rank_fractions is not None else np.linspace(0, 1, 41), dtype=float)
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


def check_energy_function(fn: Callable[[torch.Tensor, int], float]) -> None:
    """Check a student's ``fn(matrix, k) -> float``, the share of ``matrix``'s squared Frobenius norm held by
    its top ``k`` singular triplets, against :func:`energy_at` (exercise 3.1); raise ``AssertionError``
    naming the case where it differs.

    Cases: a random 12 x 7 matrix at every ``k``; an exactly rank-2 matrix (all the energy in 2 triplets);
    a wide 5 x 9 matrix (the short side counts); a zero matrix is not asked for.
    """
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 2, generator=g) @ torch.randn(2, 7, generator=g)
    cases = [("a random 12 x 7 matrix", torch.randn(12, 7, generator=g), range(1, 8)),
             ("a rank-2 12 x 7 matrix", low, (1, 2, 3)),
             ("a wide 5 x 9 matrix", torch.randn(5, 9, generator=g), (1, 3, 5))]
    for what, matrix, ks in cases:
        s = torch.linalg.svdvals(matrix)
        for k in ks:
            got, expected = fn(matrix.clone(), k), energy_at(s, k)
            assert isinstance(got, (float, int)) or (torch.is_tensor(got) and got.numel() == 1), (
                f"energy function on {what}, k = {k}: returned {type(got).__name__}, expected a number")
            assert abs(float(got) - expected) < 1e-4, (
                f"energy function on {what}, k = {k}: returned {float(got):.6f}, expected {expected:.6f} (the share "
                "of the squared Frobenius norm, sum of the top k squared singular values over the sum of all)")
