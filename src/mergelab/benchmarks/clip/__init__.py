"""The ``clip`` size: open_clip image towers (ViT-B-32 by default) on the 8 standard vision tasks.

* :mod:`.datasets` - loaders for Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN from a data
  root, the public validation-split rule, class names and prompt templates;
* :mod:`.model` - open_clip loading and zero-shot heads from the text tower;
* :mod:`.checkpoints` - import of existing experts (state dicts and pickled modules);
* :mod:`.benchmark` - :class:`ClipBenchmark`, with the interface of the ``tiny`` benchmark;
* :mod:`.synthetic` - tiny synthetic datasets in every documented layout (tests, smoke runs).

Dataset layouts and how to obtain the data: ``docs/clip.md``.
"""

from __future__ import annotations

from .benchmark import PUBLIC_RECIPE, ClipBenchmark, ClipBenchmarkConfig, ClipDataConfig, load_clip_benchmark
from .checkpoints import CheckpointError
from .datasets import TASKS, DatasetNotFoundError
from .model import TINY_MODEL, ClipModelConfig, WeightsNotFoundError

__all__ = ["PUBLIC_RECIPE", "TASKS", "TINY_MODEL", "CheckpointError", "ClipBenchmark", "ClipBenchmarkConfig",
           "ClipDataConfig", "ClipModelConfig", "DatasetNotFoundError", "WeightsNotFoundError",
           "load_clip_benchmark"]
