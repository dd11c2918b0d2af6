"""Weight averaging (uniform model soup): ``theta_0 + (1/T) sum_t tau_t``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..task_vectors import TaskVector
from ..utils import StateDict
from .base import assemble, validate
from .registry import register_merge


@register_merge("weight_averaging", pretty_name="Weight averaging", reference="wortsman2022soups", identity={})
def merge_weight_averaging(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]
                           ) -> StateDict:
    """Mean of the fine-tuned models: ``theta_0 + (1/T) sum_t tau_t`` (model soup, uniform)."""
    keys = validate(pretrained, task_vectors)
    n = len(task_vectors)
    return assemble(pretrained, keys, lambda k: sum(tv[k] for tv in task_vectors) / n)
