"""The kit a merge-method author uses: check the inputs, and build ``theta_0 + U`` one tensor at a time.

Methods work one parameter tensor at a time, so peak memory stays near one model plus one layer of
every task, and run on whatever device the tensors are on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..task_vectors import TaskVector, check_compatible
from ..utils import StateDict, check_number

LayerUpdate = tuple[list[str], Callable[[str], torch.Tensor]]
"""``(keys, U_k)``: the parameters a linear merge changes, and its update ``U`` for one of them."""


def validate(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]) -> list[str]:
    """Check every task vector against the pretrained model; return the keys to merge.

    Raises ``ValueError`` for an empty list, a key the pretrained model lacks, or a shape mismatch
    (naming the task vector and the key).
    """
    if isinstance(task_vectors, (TaskVector, Mapping)) or not all(isinstance(tv, TaskVector) for tv in task_vectors):
        got = type(task_vectors).__name__ if isinstance(task_vectors, (TaskVector, Mapping)) else \
            f"a list holding {', '.join(sorted({type(tv).__name__ for tv in task_vectors}))}"
        raise ValueError(f"task_vectors must be a list of TaskVector (one per task); got {got}. From a dict of "
                         "task vectors (task_vectors_from), pass list(task_vectors.values()).")
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty; pass at least one TaskVector to merge.")
    keys = list(task_vectors[0].keys())
    float_pre = {k: v for k, v in pretrained.items() if k in task_vectors[0].vector}
    if set(keys) - set(pretrained):
        extra = sorted(set(keys) - set(pretrained))[0]
        raise ValueError(f"task vector 0 has key {extra!r} that the pretrained state dict lacks: "
                         "the models do not share an architecture.")
    for i, tv in enumerate(task_vectors):
        check_compatible(float_pre, tv.vector, f"task vector {i}")
    return keys


def assemble(pretrained: Mapping[str, torch.Tensor], keys: Iterable[str],
             update: Callable[[str], torch.Tensor]) -> StateDict:
    """``pretrained + update(k)`` for every ``k`` in ``keys`` (in float32, cast back to the
    parameter's dtype), a copy of ``pretrained[k]`` elsewhere. ``update`` is called one key at a time
    and its result dropped once added, so besides its inputs a merge holds the merged model and one
    layer's update (streaming), never a second full model of updates."""
    keys = set(keys)
    out: StateDict = {}
    for k, v in pretrained.items():
        out[k] = (v.float() + update(k).to(v.device)).to(v.dtype) if k in keys else v.clone()
    return out


def scaled(pretrained: Mapping[str, torch.Tensor], update: LayerUpdate, coefficient: float) -> StateDict:
    """``theta_0 + coefficient * U``, one parameter at a time."""
    check_number("coefficient", coefficient)
    keys, layer = update
    return assemble(pretrained, keys, lambda k: coefficient * layer(k))
