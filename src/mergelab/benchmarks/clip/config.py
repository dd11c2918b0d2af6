"""Configuration of the ``clip`` benchmark: datasets (:class:`ClipDataConfig`), the whole benchmark
(:class:`ClipBenchmarkConfig`) and the public fine-tuning recipe the released experts were trained with."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ... import codeversion, paths
from ...cache import build_lock
from ...training import FinetuneConfig
from ...utils import atomic_write_text, check_integer, check_number
from ..base import config_from, task_names
from . import datasets as ds
from .model import ClipModelConfig

PUBLIC_RECIPE = FinetuneConfig(optimizer="adamw", lr=1e-5, batch_size=128, num_steps=2000, schedule="cosine",
                               warmup_steps=500, weight_decay=0.1, grad_clip=1.0, seed=0)
"""The fine-tuning recipe behind the public experts: AdamW, lr 1e-5, weight decay 0.1, batch 128,
cosine schedule with 500 warm-up steps, gradient-norm clip 1.0, about 2,000 steps, head frozen, fp32.
With ``data.train_epochs: public`` an expert's number of steps is the public one (:data:`PUBLIC_EPOCHS`)."""

PUBLIC_EPOCHS: dict[str, int] = {"Cars": 35, "DTD": 76, "EuroSAT": 12, "GTSRB": 11, "MNIST": 5, "RESISC45": 15,
                                 "SUN397": 14, "SVHN": 4}
"""Epochs per task of the public fine-tuning (source: the official TSV code, finetune.py; the task-vector
release used the same): a run of ``epochs * ceil(n_train / batch_size)`` steps, 1,960 (SUN397) to
2,150 (MNIST) at batch 128."""


def synthetic_root() -> Path:
    """The folder of the synthetic datasets that the current version of their writer makes (not written here):
    ``<data>/clip/synthetic``, and ``synthetic-v<n>`` once ``codeversion.CODE_VERSIONS["synthetic"]`` is past 1."""
    version = codeversion.CODE_VERSIONS["synthetic"]
    return paths.data_dir() / "clip" / ("synthetic" if version == 1 else f"synthetic-v{version}")


@dataclass(frozen=True)
class ClipDataConfig:
    """Where the datasets are and how they are read.

    Attributes:
        root: the data root (layouts in ``docs/clip.md``); ``None``: ``$MERGELAB_CLIP_DATA_ROOT``.
        synthetic: write (once) and use tiny synthetic datasets under ``<data>/clip/synthetic`` (``synthetic-v<n>``
            once their writer's code version, ``codeversion.CODE_VERSIONS["synthetic"]``, is past 1)
            instead of real ones: for smoke runs and tests; numbers mean nothing.
        max_train, max_val, max_test: cap each split at this many examples (a seeded subset);
            ``None`` keeps them all (the benchmark as published).
        num_workers: DataLoader worker processes (``0``: load in the main process).
        eval_batch_size: images per evaluation batch; also the most images a training loop that takes
            whole splits in one batch forwards at once (:attr:`ClipBenchmark.micro_batch_size`).
        eval_cache_gb: memory (GiB) for keeping ``val`` splits decoded in RAM as ``uint8`` between
            evaluations (coefficient sweeps evaluate them many times); ``0`` disables it.
        train_epochs: how long an expert trains: ``None`` for ``num_steps`` of its recipe; ``"public"``
            for the public number of epochs of each task (:data:`PUBLIC_EPOCHS`), i.e.
            ``epochs * ceil(n_train / batch_size)`` steps; or a ``{task: epochs}`` mapping.
    """

    root: str | None = None
    synthetic: bool = False
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    num_workers: int = 4
    eval_batch_size: int = 256
    eval_cache_gb: float = 0.0
    train_epochs: str | dict[str, int] | None = None

    def __post_init__(self) -> None:
        epochs = self.train_epochs
        if not (epochs is None or epochs == "public" or (isinstance(epochs, Mapping) and epochs and all(
                isinstance(k, str) and not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1
                for k, v in epochs.items()))):
            raise ValueError(f"data train_epochs={epochs!r} is not valid; use null (the recipe's num_steps), "
                             "'public' (the public epochs per task) or a mapping task: positive integer.")
        if isinstance(epochs, Mapping):
            unknown = sorted(set(epochs) - set(ds.TASKS))
            if unknown:
                raise ValueError(f"data train_epochs names {unknown[0]!r}, not a clip task; valid: "
                                 f"{', '.join(ds.TASKS)}.")
        if self.root is not None and not isinstance(self.root, (str, os.PathLike)):
            raise ValueError(f"data root={self.root!r} is not valid; use a folder path or null "
                             "($MERGELAB_CLIP_DATA_ROOT).")
        if not isinstance(self.synthetic, bool):
            raise ValueError(f"data synthetic={self.synthetic!r} is not valid; use true (tiny synthetic datasets for "
                             "smoke runs) or false.")
        for name in ("max_train", "max_val", "max_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"data {name}={v!r} is not valid; use a positive integer or null (all examples).")
        check_integer("data num_workers", self.num_workers, minimum=0)
        check_integer("data eval_batch_size", self.eval_batch_size)
        check_number("data eval_cache_gb", self.eval_cache_gb, low=0)

    def epochs(self, task: str) -> int | None:
        """Epochs an expert on ``task`` trains for, or ``None`` when the recipe's ``num_steps`` decides."""
        if self.train_epochs is None:
            return None
        table = PUBLIC_EPOCHS if self.train_epochs == "public" else self.train_epochs
        if task not in table:
            raise ValueError(f"data train_epochs has no entry for task {task!r}; give one (valid tasks: "
                             f"{', '.join(ds.TASKS)}) or use 'public'.")
        return int(table[task])

    def limit(self, split: str) -> int | None:
        return {"train": self.max_train, "val": self.max_val, "test": self.max_test}[split]

    def resolve_root(self) -> Path:
        """The data root, or a clear error saying how to set it."""
        if self.synthetic:
            from .synthetic import write_synthetic_datasets

            root = synthetic_root()
            done = root / ".complete"
            if not done.is_file():
                root.mkdir(parents=True, exist_ok=True)
                with build_lock(done):  # chapters side by side on a fresh data folder write them once
                    if not done.is_file():
                        write_synthetic_datasets(root)
                        atomic_write_text(done, "written by mergelab.benchmarks.clip.synthetic\n")
            return root
        value = self.root or os.environ.get("MERGELAB_CLIP_DATA_ROOT")
        if not value:
            raise ds.DatasetNotFoundError(
                "no data root for the clip benchmark: set DATA=/path/to/datasets with make (exported as "
                "MERGELAB_CLIP_DATA_ROOT), or data.root in the parameter file. The folder must hold the 8 "
                "datasets in the layouts of docs/clip.md.")
        return Path(value).expanduser().resolve()


@dataclass(frozen=True)
class ClipBenchmarkConfig:
    """Everything that defines a ``clip`` benchmark run.

    Attributes:
        tasks: a subset of :data:`mergelab.benchmarks.clip.datasets.TASKS` (default: all 8).
        data: where the datasets are and how they are read.
        model: the open_clip model and its files.
        checkpoint_every: save a resumable checkpoint every this many fine-tuning steps.
    """

    tasks: tuple[str, ...] = ds.TASKS
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        tasks = tuple(ds.check_task(t) for t in self.tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks={list(self.tasks)!r} must be a non-empty list of distinct tasks from "
                             f"{', '.join(ds.TASKS)}.")
        object.__setattr__(self, "tasks", tasks)
        check_integer("checkpoint_every", self.checkpoint_every)

    @classmethod
    def from_params(cls, tasks: Sequence[str] | None = None, data: dict | None = None, model: dict | None = None,
                    pretrain: dict | None = None, head_shots: int | None = None,
                    checkpoint_every: int = 250) -> "ClipBenchmarkConfig":
        """Build from plain values, as a papermill parameter file gives them.

        ``pretrain`` and ``head_shots`` belong to the ``tiny`` size (its own pretraining and prototype
        heads); the clip size starts from open_clip's pretrained weights and zero-shot text heads, so
        they must be empty (``{}``/``null``) here.
        """
        if pretrain:
            raise ValueError(f"pretrain={pretrain!r} does not apply to the clip benchmark (its encoder comes "
                             "pretrained from open_clip); set pretrain: {} in the clip parameter file.")
        if head_shots is not None:
            raise ValueError(f"head_shots={head_shots!r} does not apply to the clip benchmark (its heads are "
                             "zero-shot text heads); set head_shots: null in the clip parameter file.")
        return cls(tasks=task_names(tasks, ds.TASKS) or ds.TASKS,
                   data=config_from(ClipDataConfig, "data", data, "clip"),
                   model=config_from(ClipModelConfig, "model", model, "clip"), checkpoint_every=checkpoint_every)
