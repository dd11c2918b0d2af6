"""Training: fine-tuning (:mod:`.finetune`), pretraining of the tiny encoder (:mod:`.pretrain`), sweeps of
many cached runs (:mod:`.sweep`) and epoch-by-epoch trajectories (:mod:`.trajectories`)."""

from __future__ import annotations

from .finetune import (
                       OPTIMIZERS,
                       SCHEDULES,
                       FinetuneConfig,
                       batch_stream,
                       finetune,
                       frozen_during,
                       frozen_parameters,
                       lr_at,
                       make_optimizer,
                       recipe_fields,
                       subset_indices,
                       training_indices,
)
from .pretrain import (
                       PRETEXT_OBJECTIVES,
                       PretrainConfig,
                       augment,
                       info_nce,
                       pretrain_attributes,
                       pretrain_contrastive,
                       pretrain_factors,
)

__all__ = ["OPTIMIZERS", "PRETEXT_OBJECTIVES", "SCHEDULES", "FinetuneConfig", "PretrainConfig", "augment",
           "batch_stream", "finetune", "frozen_during", "frozen_parameters", "info_nce", "lr_at", "make_optimizer",
           "pretrain_attributes", "pretrain_contrastive", "pretrain_factors", "recipe_fields", "subset_indices",
           "training_indices"]
