"""DARE (Yu et al., 2024) on task arithmetic: drop each task-vector entry at random, rescale the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..task_vectors import TaskVector
from ..utils import StateDict, check_integer
from .base import LayerUpdate, scaled, validate
from .registry import register_merge
from .sparsify import StreamedDrops


def dare_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                drop_rate: float = 0.5, seed: int = 0) -> LayerUpdate:
    """DARE's update: the sum of the task vectors sparsified by
    :func:`~mergelab.merging.sparsify.drop_and_rescale` (seed ``seed + t``), one parameter at a time."""
    keys = validate(pretrained, task_vectors)
    check_integer("seed", seed, minimum=0)
    drops = [StreamedDrops(tv, drop_rate, seed + i) for i, tv in enumerate(task_vectors)]
    return keys, lambda k: sum(d[k] for d in drops)


@register_merge("dare", coefficient_grid=np.round(np.arange(0.0, 1.001, 0.05), 2), update=dare_update,
                pretty_name="DARE", reference="yu2024dare", identity={"coefficient": 1.0, "drop_rate": 0.0})
def merge_dare(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
               coefficient: float = 0.3, drop_rate: float = 0.5, seed: int = 0) -> StateDict:
    """DARE then task arithmetic: each task vector sparsified (seed ``seed + t``), then summed."""
    return scaled(pretrained, dare_update(pretrained, task_vectors, drop_rate, seed), coefficient)
