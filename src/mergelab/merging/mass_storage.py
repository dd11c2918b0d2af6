"""What MASS stores (:mod:`mergelab.merging.mass`): the pretrained model once and, per task, the TSV-C factors
of every matrix TSV decomposes and every other tensor in full, except the tensors the task left unchanged (a
tensor frozen while the experts fine-tuned: its task vector is zero and TSV-C stores nothing for it). Counted on stored factors
(:func:`storage_bytes`) or from parameter shapes alone (:func:`storage_of_shapes`, for an architecture
nobody fine-tuned here, e.g. ViT-B-32's shapes on PyTorch's ``meta`` device)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from ..utils import StateDict
from .tsv import CompressedTaskVector


def model_shapes(state: StateDict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every floating-point tensor of a state dict (what :func:`storage_of_shapes` reads)."""
    return {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}


def _largest_dense(dense_sizes: Mapping[str, int], model_size: int) -> dict[str, Any]:
    """``largest_dense`` (the name of the largest of one task's tensors stored in full, ``""`` when none) and
    ``largest_dense_share`` (its number of values over the model's)."""
    name = max(dense_sizes, key=dense_sizes.__getitem__, default="")
    return {"largest_dense": name, "largest_dense_share": dense_sizes.get(name, 0) / model_size}


def storage_bytes(pretrained: StateDict, compressed: Mapping[str, CompressedTaskVector]) -> dict[str, Any]:
    """What MASS stores: ``theta_0`` plus every task's factors and dense tensors, in bytes and as a
    multiple of one model (``theta_0``'s floating-point tensors).

    Returns ``{"model_bytes", "factor_bytes", "dense_bytes", "total_bytes", "storage_multiple"}``, plus
    ``largest_dense`` and ``largest_dense_share`` (the largest tensor one task stores in full, and its size as a
    share of the model: what each task adds for it) and ``unchanged`` (the parameters no task changed, in
    ``theta_0``'s order: stored once, in ``theta_0``, not per task).
    """
    weights = [v for v in pretrained.values() if v.is_floating_point()]
    model = sum(v.numel() * v.element_size() for v in weights)
    factors = sum(t.numel() * t.element_size() for c in compressed.values() for f in c.factors.values() for t in f)
    dense = sum(t.numel() * t.element_size() for c in compressed.values() for t in c.dense.values())
    total = model + factors + dense
    one_task = next(iter(compressed.values()), None)
    sizes = {} if one_task is None else {k: t.numel() for k, t in one_task.dense.items()}
    unchanged_per_task = [set(c.unchanged) for c in compressed.values()]
    unchanged = [k for k in pretrained if unchanged_per_task and all(k in u for u in unchanged_per_task)]
    return {"model_bytes": model, "factor_bytes": factors, "dense_bytes": dense, "total_bytes": total,
            "storage_multiple": total / model, **_largest_dense(sizes, sum(v.numel() for v in weights)),
            "unchanged": unchanged}


def storage_of_shapes(shapes: Mapping[str, Sequence[int]], num_tasks: int, bytes_per_value: int = 4,
                      unchanged: Collection[str] = ()) -> dict[str, Any]:
    """What MASS stores for a model whose floating-point parameters have these ``shapes``, with
    ``num_tasks`` tasks and TSV-C's default rank, computed from the shapes alone (no weights, no SVD): the
    accounting of :func:`storage_bytes`, for an architecture a user has not fine-tuned (e.g. ViT-B-32's shapes
    read from a model built on PyTorch's ``meta`` device).

    Per task: ``(U (m, k), s (k,), V (n, k))`` for every matrix TSV decomposes (:func:`mergelab.layers.is_decomposed`,
    ``k = floor(min(m, n) / num_tasks)``, :func:`mergelab.linalg.svd.default_rank`), every other tensor in full;
    plus the model once. Every value takes ``bytes_per_value`` bytes (4: float32). ``unchanged``: parameters no
    task changes (frozen while the experts fine-tune), stored once in the model and not per task; none by default,
    as when every parameter is fine-tuned (the public benchmark's checkpoints).

    Returns:
        The keys of :func:`storage_bytes` (bytes, ``storage_multiple`` in models, the largest tensor kept in
        full and its share of the model).
    """
    from ..layers import is_decomposed
    from ..linalg.svd import default_rank

    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r} is not valid; use a positive integer (the tasks MASS stores).")
    if not shapes:
        raise ValueError("shapes is empty; pass every floating-point parameter's name and shape.")
    unknown = sorted(set(unchanged) - set(shapes))
    if unknown:
        raise ValueError(f"unchanged names {unknown[0]!r}, which is not among the shapes' parameters; valid: names of "
                         "shapes.")
    model = factors = dense = 0
    dense_sizes = {}
    for name, shape in shapes.items():
        size = math.prod(int(d) for d in shape)
        model += size
        if name in unchanged:
            continue
        if is_decomposed(name, torch.empty(tuple(shape), device="meta")):
            k = default_rank(shape, num_tasks)
            factors += num_tasks * k * (int(shape[0]) + int(shape[1]) + 1)
        else:
            dense += num_tasks * size
            dense_sizes[name] = size
    total = model + factors + dense
    return {"model_bytes": model * bytes_per_value, "factor_bytes": factors * bytes_per_value,
            "dense_bytes": dense * bytes_per_value, "total_bytes": total * bytes_per_value,
            "storage_multiple": total / model, **_largest_dense(dense_sizes, model),
            "unchanged": [k for k in shapes if k in unchanged]}

__all__ = ["model_shapes", "storage_bytes", "storage_of_shapes"]
