"""Task arithmetic (Ilharco et al., 2023): ``theta_0 + coefficient * sum_t tau_t``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..task_vectors import TaskVector
from ..utils import StateDict
from .base import LayerUpdate, scaled, validate
from .registry import register_merge


def task_arithmetic_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]
                           ) -> LayerUpdate:
    """Task arithmetic's update ``sum_t tau_t``, per parameter."""
    keys = validate(pretrained, task_vectors)
    return keys, lambda k: sum(tv[k] for tv in task_vectors)


@register_merge("task_arithmetic", coefficient_grid=np.round(np.arange(0.0, 1.001, 0.05), 2),
                update=task_arithmetic_update, pretty_name="Task arithmetic", reference="ilharco2023task", identity={"coefficient": 1.0})
def merge_task_arithmetic(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                          coefficient: float = 0.3) -> StateDict:
    """Task arithmetic: ``theta_0 + coefficient * sum_t tau_t`` (Ilharco et al., 2023)."""
    return scaled(pretrained, task_arithmetic_update(pretrained, task_vectors), coefficient)
