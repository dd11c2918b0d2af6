"""TIES-Merging (Yadav et al., 2023): trim each task vector to its largest entries, elect a sign per
entry, average the agreeing entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..task_vectors import TaskVector
from ..utils import StateDict
from .base import LayerUpdate, scaled, validate
from .registry import register_merge
from .sparsify import ties_merge_chunked, ties_threshold


def ties_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                density: float = 0.2) -> LayerUpdate:
    """TIES' update (trim to ``density``, elect signs, disjoint mean), per parameter."""
    keys = validate(pretrained, task_vectors)
    thresholds = torch.tensor([ties_threshold(tv, density) for tv in task_vectors])
    return keys, lambda k: ties_merge_chunked([tv[k] for tv in task_vectors], thresholds)


@register_merge("ties", coefficient_grid=np.round(np.arange(0.0, 2.01, 0.1), 2), update=ties_update,
                pretty_name="TIES", reference="yadav2023ties", identity={"coefficient": 1.0, "density": 1.0})
def merge_ties(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
               coefficient: float = 1.0, density: float = 0.2) -> StateDict:
    """TIES-Merging (Yadav et al., 2023): keep the top ``density`` share of each task vector by
    magnitude, elect a sign per entry by total mass, average the agreeing entries, scale by
    ``coefficient``."""
    return scaled(pretrained, ties_update(pretrained, task_vectors, density), coefficient)
