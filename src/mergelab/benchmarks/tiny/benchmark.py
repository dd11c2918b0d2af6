"""The ``tiny`` benchmark: data, a pretrained encoder, frozen heads, cached experts, evaluation.

A benchmark object gives every notebook the same small interface, which the ``clip`` size mirrors:

* ``tasks``; ``split(task, split) -> (X, y)``;
* ``pretrained_state()``; ``heads[task]``;
* ``expert(task, FinetuneConfig)`` and ``multitask(FinetuneConfig)``, cached by configuration;
  ``finetune_encoder(encoder, tasks, cfg, on_step)``, the loop behind them, for sweeps;
* ``evaluate(state, split) -> {task: accuracy}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ... import paths
from ...cache import Artifact
from ..base import BenchmarkBase
from ...models import ClassificationHead, TinyViTConfig, build_tiny_encoder, encode, load_encoder_state
from .data import GENERATOR_VERSION, PRETEXT_ATTRIBUTES, SPLITS, TASK_CLASSES, TASKS, TinyDataConfig, load_pretext, load_task
from .data import check_task as check_tiny_task
from ...training import FinetuneConfig, PretrainConfig, finetune, pretrain_attributes, pretrain_contrastive
from ...utils import (StateDict, atomic_save_safetensors, atomic_write_json, clone_state_dict, config_hash,
                    load_safetensors, pick_device)

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Map ``[0, 1]`` pixels to roughly zero mean, unit variance: ``(x - 0.5) / 0.25``."""
    return (x - PIXEL_MEAN) / PIXEL_STD


@dataclass(frozen=True)
class TinyBenchmarkConfig:
    """Everything that defines the tiny benchmark (its hash keys every cache derived from it).

    Attributes:
        data: sizes and seed of the generated tasks.
        model: shape of the vision transformer.
        pretrain: contrastive pretraining on the pretext pool.
        head_shots: examples per class averaged into each frozen head's class prototype (the role
            CLIP's text prompts play); few shots keep the heads imperfect, as zero-shot heads are.
            Prototypes are centred (their mean over classes removed) before normalization, so
            that class directions differ even where pretrained features are alike.
        logit_scale: head temperature multiplier (CLIP's ``logit_scale.exp()`` is 100).
        tasks: the tasks used, a subset of :data:`mergelab.tinydata.TASKS`.
    """

    data: TinyDataConfig = field(default_factory=TinyDataConfig)
    model: TinyViTConfig = field(default_factory=TinyViTConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    head_shots: int = 8
    logit_scale: float = 30.0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        for t in self.tasks:
            check_tiny_task(t)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks={self.tasks!r} must be a non-empty list of distinct tasks from {TASKS}.")
        if self.head_shots < 1:
            raise ValueError(f"head_shots={self.head_shots!r} is not valid; use a positive integer.")

    @classmethod
    def from_params(cls, data: dict | None = None, model: dict | None = None,
                    pretrain: dict | None = None, **rest: Any) -> "TinyBenchmarkConfig":
        """Build from plain dicts (as they come from a papermill parameter file)."""
        if "tasks" in rest and rest["tasks"] is not None:
            rest["tasks"] = tuple(rest["tasks"])
        return cls(data=TinyDataConfig(**(data or {})), model=TinyViTConfig(**(model or {})),
                   pretrain=PretrainConfig(**(pretrain or {})), **rest)


class TinyBenchmark(BenchmarkBase):
    """The offline, laptop-sized twin of the 8-task ViT-B-32 benchmark.

    Args:
        config: the benchmark's definition.
        device: ``"auto"`` (GPU when there is one), ``"cpu"``, ``"cuda"``...
        progress: show progress bars for long steps.
    """

    name = "tiny"
    """The benchmark's size, as ``mergelab.load_benchmark`` names it."""
    micro_batch_size: int | None = None
    """Training loops that take whole splits in one batch (full-batch gradient descent) may forward
    at most this many examples at once; ``None``: no limit (the tiny images are small)."""

    def __init__(self, config: TinyBenchmarkConfig | None = None, device: str | None = "auto",
                 progress: bool = True) -> None:
        self.config = config or TinyBenchmarkConfig()
        self.device = pick_device(device)
        self.progress = progress
        self.tasks: tuple[str, ...] = self.config.tasks
        self._splits: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pretrained: StateDict | None = None
        self._heads: dict[str, ClassificationHead] | None = None
        self._encoder = build_tiny_encoder(self.config.model)

    # ------------------------------------------------------------------ identity and caches
    @property
    def key(self) -> str:
        """Hash of the benchmark's definition except the task list (heads are per task)."""
        cfg = asdict(self.config)
        cfg.pop("tasks")
        return config_hash({"benchmark": "tiny", "generator_version": GENERATOR_VERSION, **cfg})

    @property
    def cache_dir(self) -> Path:
        path = paths.data_dir() / "tiny" / f"benchmark-{self.key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def experts_dir(self) -> Path:
        path = paths.data_dir() / "experts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def class_names(self, task: str) -> list[str]:
        return TASK_CLASSES[check_tiny_task(task)]

    # ------------------------------------------------------------------ data
    def split(self, task: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images ``(N, 3, 32, 32)`` float32 and labels ``(N,)`` int64 (CPU)."""
        check_tiny_task(task)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; use one of {', '.join(SPLITS)}.")
        if (task, split) not in self._splits:
            X, y = load_task(task, split, self.config.data)
            self._splits[task, split] = (normalize_images(torch.from_numpy(X)), torch.from_numpy(y))
        return self._splits[task, split]

    def images(self, task: str, split: str, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Normalized images ``(len(indices), 3, 32, 32)``: rows ``indices`` of ``split`` (the same
        interface as the clip benchmark's, which decodes them)."""
        X, _ = self.split(task, split)
        return X[torch.as_tensor(indices, dtype=torch.long)]

    def raw_images(self, task: str, split: str = "train") -> torch.Tensor:
        """Images in ``[0, 1]`` for display, ``(N, 3, 32, 32)``."""
        X, _ = self.split(task, split)
        return X * PIXEL_STD + PIXEL_MEAN

    # ------------------------------------------------------------------ the pretrained model
    def new_encoder(self, state: StateDict | None = None) -> torch.nn.Module:
        """A fresh encoder module, loaded with ``state`` when given."""
        enc = build_tiny_encoder(self.config.model)
        return load_encoder_state(enc, state) if state is not None else enc

    def pretrained_state(self) -> StateDict:
        """The encoder after contrastive pretraining on the pretext pool (cached; a copy)."""
        if self._pretrained is None:
            path = self.cache_dir / "pretrained.safetensors"
            if not path.is_file():
                torch.manual_seed(self.config.pretrain.seed)
                enc = build_tiny_encoder(self.config.model)
                images, attributes = (torch.from_numpy(a) for a in load_pretext(self.config.data))
                start = time.perf_counter()
                if self.config.pretrain.objective == "attributes":
                    losses = pretrain_attributes(enc, images, attributes, list(PRETEXT_ATTRIBUTES.values()),
                                                 self.config.pretrain, normalize_images, device=self.device,
                                                 progress=self.progress)
                else:
                    losses = pretrain_contrastive(enc, images, self.config.pretrain, normalize_images,
                                                  device=self.device, progress=self.progress)
                atomic_write_json(path.with_suffix(".json"), {
                    "config": asdict(self.config), "loss": losses,
                    "wall_time_s": time.perf_counter() - start})
                atomic_save_safetensors(path, enc.state_dict())
            self._pretrained = load_safetensors(path)
        return clone_state_dict(self._pretrained)

    def pretraining_log(self) -> dict[str, Any]:
        """Loss curve and wall time of the pretraining run."""
        self.pretrained_state()
        return json.loads((self.cache_dir / "pretrained.json").read_text())

    @property
    def heads(self) -> dict[str, ClassificationHead]:
        """Frozen per-task heads: centred mean pretrained feature of ``head_shots`` examples per class."""
        if self._heads is None:
            path = self.cache_dir / f"heads-centred-shots{self.config.head_shots}.safetensors"
            if not path.is_file():
                enc = self.new_encoder(self.pretrained_state())
                protos = {}
                for task in TASKS:
                    X, y = self.split(task, "train")
                    g = torch.Generator().manual_seed(0)
                    order = torch.randperm(len(y), generator=g)
                    rows = []
                    for c in range(len(TASK_CLASSES[task])):
                        idx = order[y[order] == c][: self.config.head_shots]
                        feats = F.normalize(encode(enc, X[idx], device=self.device), dim=-1)
                        rows.append(feats.mean(0))
                    rows = torch.stack(rows)
                    protos[task] = rows - rows.mean(0, keepdim=True)
                atomic_save_safetensors(path, protos)
            weights = load_safetensors(path)
            self._heads = {t: ClassificationHead(weights[t], self.config.logit_scale) for t in TASKS}
        return self._heads

    # ------------------------------------------------------------------ experts
    def finetune_encoder(self, encoder: torch.nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                         on_step: Callable[[int, torch.nn.Module], None] | None = None,
                         desc: str = "fine-tune", progress: bool | None = None) -> dict[str, list[float]]:
        """Fine-tune ``encoder`` in place on the training split of ``tasks`` with their frozen heads.

        The loop behind :meth:`expert` and :meth:`multitask` (:func:`mergelab.training.finetune`), for
        callers that watch the run: ``on_step(step, model)`` after every optimizer step (sweeps save
        checkpoints and probe gradients there). Returns ``{"loss": [...], "lr": [...]}`` per step.
        """
        return finetune(encoder, {t: self.split(t, "train") for t in tasks}, {t: self.heads[t] for t in tasks},
                        cfg, device=self.device, desc=desc,
                        progress=self.progress if progress is None else progress, on_step=on_step)

    def head_digest(self, task: str) -> str:
        """Hash of a task's head weights and scale: part of every cache key that depends on the head."""
        return self.heads[task].digest()

    def check_task(self, task: str) -> str:
        """``task`` if the tiny benchmark has it, else an error listing the tasks."""
        return check_tiny_task(task)

    def _train_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, artifact: Artifact
                   ) -> tuple[StateDict, dict[str, Any]]:
        enc = self.new_encoder(self.pretrained_state())
        start = time.perf_counter()
        history = self.finetune_encoder(enc, tasks, cfg,
                                        desc=f"{kind} {'+'.join(tasks) if len(tasks) < 3 else f'{len(tasks)} tasks'}")
        state = {k: v.detach().cpu() for k, v in enc.state_dict().items()}
        return state, {"kind": kind, "tasks": list(tasks), "benchmark": "tiny", "benchmark_key": self.key,
                       "finetune": asdict(cfg), "loss": history["loss"], "lr": history["lr"],
                       "wall_time_s": time.perf_counter() - start, "device": str(self.device)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _task_logits(self, state: StateDict, split: str, tasks: Iterable[str] | None, batch_size: int
                     ) -> Iterator[tuple[str, int, Iterator[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per task: ``(task, n_examples, batches)``, the batches being ``(logits (B, C), labels (B,))``
        on ``self.device`` for the encoder ``state`` with the task's own head, in split order."""
        enc = load_encoder_state(self._encoder, state).to(self.device).eval()
        for task in tasks or self.tasks:
            X, y = self.split(task, split)
            head = self.heads[task].to(self.device)
            batches = ((head(enc(X[i:i + batch_size].to(self.device))), y[i:i + batch_size].to(self.device))
                       for i in range(0, len(y), batch_size))
            yield task, len(y), batches

    @torch.no_grad()
    def evaluate(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None,
                 batch_size: int = 1000) -> dict[str, float]:
        """Top-1 accuracy (fraction 0..1) of the encoder ``state`` on each task with its own head."""
        return {task: sum(int((logits.argmax(-1) == y).sum()) for logits, y in batches) / n
                for task, n, batches in self._task_logits(state, split, tasks, batch_size)}

    @torch.no_grad()
    def evaluate_loss(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None,
                      batch_size: int = 1000) -> dict[str, float]:
        """Mean cross-entropy (nats) of the encoder ``state`` on each task with its own head."""
        return {task: sum(float(F.cross_entropy(logits, y, reduction="sum")) for logits, y in batches) / n
                for task, n, batches in self._task_logits(state, split, tasks, batch_size)}

