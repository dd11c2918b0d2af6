"""TSV-C (Gargiulo et al., CVPR 2025): a task vector stored as each matrix's top singular triplets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...layers import is_decomposed
from ...linalg import default_rank, truncated_svd
from ...task_vectors import TaskVector


# ----------------------------------------------------------------------------- TSV-C
@dataclass
class CompressedTaskVector:
    """A task vector with each decomposed matrix stored as its top-``k`` singular triplets.

    Attributes:
        factors: parameter name to ``(U (m, k), s (k,), V (n, k))``.
        dense: parameters stored in full (not decomposed: biases, LayerNorm, ``conv1``...), except those the
            task left unchanged (every entry exactly zero, e.g. a tensor frozen while the expert fine-tuned):
            they are not stored (:attr:`unchanged`) and read back as zeros.
        shapes: every parameter's shape, in the original key order.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes needed to store the compressed task vector (factors plus dense tensors)."""
        total = sum(t.numel() * t.element_size() for f in self.factors.values() for t in f)
        return total + sum(t.numel() * t.element_size() for t in self.dense.values())

    @property
    def unchanged(self) -> list[str]:
        """Parameters stored neither as factors nor in full: the task did not change them (zero task vector)."""
        return [k for k in self.shapes if k not in self.factors and k not in self.dense]

    def dense_tensor(self, name: str) -> torch.Tensor:
        """The task vector of a parameter kept out of the factors: as stored, or zeros of its shape when the task
        left it unchanged (float32, on the device of the stored tensors)."""
        if name in self.dense:
            return self.dense[name]
        if name not in self.shapes or name in self.factors:
            raise KeyError(f"{name!r} is not a dense parameter of this compressed task vector.")
        like = next(iter(self.dense.values()), None)
        if like is None:
            like = next((f[0] for f in self.factors.values()), torch.empty(0))
        return torch.zeros(self.shapes[name], dtype=torch.float32, device=like.device)

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
    """TSV-C: keep each decomposed matrix's top singular triplets, every other tensor in full, except a tensor
    the task left exactly unchanged (all zeros, e.g. frozen during fine-tuning), which is not stored at all
    (:attr:`CompressedTaskVector.unchanged`; it reads back as zeros, so every merge is the same).

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
        elif bool(v.any()):
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
            out[name] = compressed.dense_tensor(name).clone()
    return TaskVector(out)


def storage_bytes(task_vector: TaskVector | CompressedTaskVector) -> int:
    """Bytes to store a task vector (dense) or a compressed one."""
    if isinstance(task_vector, CompressedTaskVector):
        return task_vector.nbytes()
    return sum(v.numel() * v.element_size() for v in task_vector.vector.values())
