"""The ``tiny`` benchmark: data, a pretrained encoder, frozen heads, cached experts, evaluation.

A benchmark object gives every notebook the same small interface, which the ``clip`` size mirrors:

* ``tasks``; ``split(task, split) -> (X, y)``;
* ``pretrained_state()``; ``heads[task]``;
* ``expert(task, FinetuneConfig)`` and ``multitask(FinetuneConfig)``, cached by configuration;
  ``finetune_encoder(encoder, tasks, cfg, on_step)``, the loop behind them, for sweeps;
* ``evaluate(state, split) -> {task: accuracy}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ... import paths
from ...cache import Artifact
from ...models import ClassificationHead, TinyViTConfig, build_tiny_encoder, encode, load_encoder_state
from ...training import FinetuneConfig, PretrainConfig, recipe_fields, finetune, pretrain_attributes, pretrain_contrastive, pretrain_factors
from ..base import BenchmarkBase, config_from, task_names
from ... import codeversion
from .data import SPLITS, TASK_CLASSES, TASKS, TinyDataConfig, canonical_images, generator_key, load_task
from .pretext import PRETEXT_KINDS, PRETEXT_TEXTURES, load_pretext
from .data import check_task as check_tiny_task
from ...utils import (StateDict, check_number, clone_state_dict, config_hash, keeps_global_rng, torch_threads,
                    pick_device)

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25
HEAD_KINDS = ("canonical", "shots")

TINY_RECIPE = FinetuneConfig(optimizer="adamw", lr=5e-4, batch_size=64, num_steps=300, schedule="cosine",
                             warmup_steps=30, weight_decay=0.1, frozen=("conv1",))
"""The tiny benchmark's default fine-tuning recipe (issue 16): AdamW at a peak learning rate 4x below
pretraining's 2e-3, decoupled weight decay 0.1, a 10 % warm-up and a cosine decay, 300 steps x 64 (about
10 epochs of the 2,000 training images, ~21 s per expert on one CPU thread), with the patch stem ``conv1``
kept at its pretrained values. Chosen by measurement (docs/tiny-benchmark.md): among 2e-4, 5e-4 and 1e-3,
2e-4 leaves the experts unconverged (.73), 1e-3 gives task vectors of 9-15 % of ||theta_0|| and lower
normalized merges, and 5e-4 gives the largest gain of task arithmetic over zero-shot. Freezing the 8x8 patch
stem (the public ViT-B-32's pretrained patch embedding barely moves when it fine-tunes) kept the experts within
.015 and lifted task arithmetic by .034-.046 on two pretraining draws."""


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Map ``[0, 1]`` pixels to roughly zero mean, unit variance: ``(x - 0.5) / 0.25``."""
    return (x - PIXEL_MEAN) / PIXEL_STD


@dataclass(frozen=True)
class TinyBenchmarkConfig:
    """Everything that defines the tiny benchmark (its hash keys every cache derived from it).

    Attributes:
        data: sizes and seed of the generated tasks.
        model: shape of the vision transformer.
        pretrain: pretraining on the pretext pool (by default supervised by the scenes' generator
            factors, whose label spaces are disjoint from the tasks').
        heads: how each frozen head's class prototypes are built, before any fine-tuning:
            ``"canonical"`` (default): the pretrained features of clean renderings of each class
            (:func:`mergelab.tinydata.canonical_images`: a white circle on black, an ideal stripe
            pattern...), the way a text prompt names a class; they are out of the tasks' domains,
            so zero-shot is decent but imperfect. ``"shots"``: the mean feature of ``head_shots``
            training examples per class.
        head_shots: examples per class averaged into each prototype when ``heads="shots"``.
        logit_scale: head temperature multiplier (CLIP's ``logit_scale.exp()`` is 100). Features and
            prototypes are both L2-normalized and neither is centred, so they are read consistently.
        tasks: the tasks used, a subset of :data:`mergelab.tinydata.TASKS`.
    """

    data: TinyDataConfig = field(default_factory=TinyDataConfig)
    model: TinyViTConfig = field(default_factory=TinyViTConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    heads: str = "canonical"
    head_shots: int = 8
    logit_scale: float = 30.0
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        for t in self.tasks:
            check_tiny_task(t)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks={self.tasks!r} must be a non-empty list of distinct tasks from {TASKS}.")
        if self.heads not in HEAD_KINDS:
            raise ValueError(f"heads={self.heads!r} is not valid; use one of {', '.join(HEAD_KINDS)}.")
        if isinstance(self.head_shots, bool) or not isinstance(self.head_shots, int) or self.head_shots < 1:
            raise ValueError(f"head_shots={self.head_shots!r} is not valid; use a positive integer.")
        check_number("logit_scale", self.logit_scale, low=0, low_open=True)  # heads score logit_scale * cosine

    @classmethod
    def from_params(cls, data: dict | None = None, model: dict | None = None,
                    pretrain: dict | None = None, **rest: Any) -> "TinyBenchmarkConfig":
        """Build from plain dicts (as they come from a papermill parameter file); ``tasks`` missing or
        ``null``: every task. A key the size does not have is refused by name, with the valid ones."""
        tasks = task_names(rest.pop("tasks", None), TASKS)
        parts = {"data": config_from(TinyDataConfig, "data", data, "tiny"),
                 "model": config_from(TinyViTConfig, "model", model, "tiny"),
                 "pretrain": config_from(PretrainConfig, "pretrain", pretrain, "tiny")}
        return config_from(cls, "benchmark", {**rest, **parts, **({"tasks": tasks} if tasks else {})}, "tiny")


SHIPPED_PRETRAIN_THREADS = 2
"""Torch threads the shipped encoder was pretrained with (its log's ``environment``)."""


class TinyBenchmark(BenchmarkBase):
    """The offline, laptop-sized twin of the 8-task ViT-B-32 benchmark.

    Args:
        config: the benchmark's definition.
        device: ``"auto"`` (GPU when there is one), ``"cpu"``, ``"cuda"``...
        progress: show progress bars for long steps.
    """

    default_recipe = TINY_RECIPE
    """Experts and the multi-task model train with :data:`TINY_RECIPE` unless told otherwise."""

    name = "tiny"
    """The benchmark's size, as ``mergelab.load_benchmark`` names it."""
    micro_batch_size: int | None = None
    """Training loops that take whole splits in one batch (full-batch gradient descent) may forward
    at most this many examples at once; ``None``: no limit (the tiny images are small)."""
    train_threads: int = 1
    """Torch threads every fine-tuning run trains with (:meth:`expert`, :meth:`multitask`, a sweep's runs
    and the trajectories), whatever the machine or executor, so that a run's weights do not depend on the
    number of cores (threads split the reductions differently). One thread is also about the fastest for
    one 64-image run of this encoder (docs/tiny-benchmark.md, session 9); the cores are used by training
    runs side by side (``workers``)."""
    pretrain_threads: int = SHIPPED_PRETRAIN_THREADS
    """Torch threads the encoder pretrains with, whatever the machine, so that a pretrained encoder's bits do not
    depend on the number of cores. Two, the count the shipped encoder was made with; whether another machine
    remakes its bits also depends on the torch build and the CPU's kernels (docs/tiny-benchmark.md, session 21). It
    enters :attr:`encoder_key` only when it is another count."""

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
        return config_hash({"benchmark": "tiny", **generator_key(), **cfg,
                            **codeversion.key_part("pretrain")})

    def _device_part(self) -> dict[str, str]:
        """What the device adds to a key of something this size pretrains, builds or trains: nothing on the CPU
        (so the CPU's keys, and the keys mergelab ships under, stay as they were), ``{"device": "cuda"}`` on a GPU,
        whose arithmetic gives other last bits; a data folder shared by two machines then keeps both."""
        return {} if self.device.type == "cpu" else {"device": self.device.type}

    @property
    def encoder_key(self) -> str:
        """Hash of what the pretrained encoder depends on: the data, the model, the pretraining (and their
        code's version), the device where it is not the CPU (:meth:`_device_part`), not the heads (``heads``,
        ``head_shots``, ``logit_scale``): trying other heads reuses the pretrained encoder, while :attr:`key` (the
        experts' caches) still tells them apart."""
        device = self._device_part()
        return config_hash({"encoder": self.shipped_encoder_key, **device}) if device else self.shipped_encoder_key

    @property
    def shipped_encoder_key(self) -> str:
        """:attr:`encoder_key` on the CPU: the key the encoder (and its heads) ship under, looked up on every device,
        as a user of the public benchmark downloads the same CLIP weights whatever their GPU."""
        cfg = asdict(self.config)
        threads = ({} if self.pretrain_threads == SHIPPED_PRETRAIN_THREADS
                   else {"pretrain_threads": self.pretrain_threads})
        return config_hash({"benchmark": "tiny", **generator_key(), "data": cfg["data"],
                            "model": cfg["model"], "pretrain": cfg["pretrain"], **codeversion.key_part("pretrain"),
                            **threads})

    @property
    def cache_dir(self) -> Path:
        """Folder of the pretrained encoder and of its heads' prototypes
        (``heads-<kind>-threads<n>.safetensors``), keyed by :attr:`encoder_key`."""
        path = paths.data_dir() / "tiny" / f"encoder-{self.encoder_key}"
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
        self.check_split(split)
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
        """A fresh encoder module, loaded with ``state`` when given. Its random initialization is then overwritten,
        so it is drawn without touching torch's global stream: a run that trains (and so builds encoders) and one
        that reads the same run from the cache leave the stream in the same state. Without ``state`` the module is
        initialized from the global stream, as any new torch module is."""
        if state is None:
            return build_tiny_encoder(self.config.model)
        with torch.random.fork_rng(devices=[]):  # the module is built on the CPU
            enc = build_tiny_encoder(self.config.model)
        return load_encoder_state(enc, state)

    @property
    def _pretrained_artifact(self) -> Artifact:
        return Artifact(self.cache_dir / "pretrained.safetensors")

    def pretrained_state(self) -> StateDict:
        """The encoder after pretraining on the pretext pool (cached; a copy)."""
        if self._pretrained is None:
            from .ship import ENV_PRETRAIN, requested

            artifact = self._pretrained_artifact
            if requested(ENV_PRETRAIN) and artifact.exists() and artifact.meta().get("shipped"):
                raise ValueError(f"{ENV_PRETRAIN}=1 asks to pretrain the encoder here, but {artifact.path.parent} "
                                 "holds the shipped one, and experts and evaluations may have been made from it: "
                                 "remove the caches (`make clean-cache`, or point MERGELAB_DATA_DIR at an empty "
                                 "folder), then run again.")
            self._pretrained = artifact.get_or_build(self._pretrain)
        return clone_state_dict(self._pretrained)

    @keeps_global_rng
    def _pretrain(self) -> tuple[StateDict, dict[str, Any]]:
        """Pretrain a fresh encoder on the pretext pool with ``config.pretrain``, on :attr:`pretrain_threads` torch
        threads whoever calls; ``(weights, log)``. Where
        mergelab ships the encoder of this :attr:`encoder_key` (:mod:`mergelab.benchmarks.tiny.ship`), that
        encoder and its pretraining log, marked ``"shipped": True``, instead."""
        from .ship import shipped_artifact, taken

        shipped = shipped_artifact(self.shipped_encoder_key)
        if shipped is not None:
            return taken(shipped)
        with torch_threads(self.pretrain_threads):  # the same bits on any number of cores
            return self._pretrain_here()

    def _pretrain_here(self) -> tuple[StateDict, dict[str, Any]]:
        """:meth:`_pretrain` when nothing ships, on the threads it set."""
        from .ship import environment

        torch.manual_seed(self.config.pretrain.seed)
        enc = build_tiny_encoder(self.config.model)
        X, targets = load_pretext(self.config.data)
        images = torch.from_numpy(X)
        targets = {k: torch.from_numpy(v) for k, v in targets.items()}
        classes = {"kind": len(PRETEXT_KINDS), "texture": len(PRETEXT_TEXTURES)}
        start = time.perf_counter()
        objective = self.config.pretrain.objective
        if objective == "factors":
            unlabelled = None
            if self.config.pretrain.unlabelled_weight > 0:  # every task's training images, never their labels
                unlabelled = torch.cat([torch.from_numpy(load_task(t, "train", self.config.data)[0]) for t in TASKS])
            losses = pretrain_factors(enc, images, targets, classes, self.config.pretrain, normalize_images,
                                      device=self.device, progress=self.progress, unlabelled=unlabelled)
        elif objective == "attributes":
            kind = targets["kind"].clamp_min(0)  # scenes without objects: kind 0 stands for "none"
            kind = torch.where(targets["kind"] < 0, len(PRETEXT_KINDS), kind)
            losses = pretrain_attributes(enc, images, torch.stack([kind, targets["texture"]], 1),
                                         [len(PRETEXT_KINDS) + 1, len(PRETEXT_TEXTURES)], self.config.pretrain,
                                         normalize_images, device=self.device, progress=self.progress)
        else:
            losses = pretrain_contrastive(enc, images, self.config.pretrain, normalize_images,
                                          device=self.device, progress=self.progress)
        return enc.state_dict(), {"config": asdict(self.config), "loss": losses,
                                  "wall_time_s": time.perf_counter() - start, "environment": environment()}

    @property
    def pretrained_sha256(self) -> str | None:
        """SHA-256 of the cached pretrained weights file (``None`` before pretraining has run or been loaded)."""
        if self._pretrained is None:
            return None
        return self._pretrained_artifact.meta().get("sha256")

    def pretraining_log(self) -> dict[str, Any]:
        """Loss curve and wall time of the pretraining run."""
        self.pretrained_state()
        return self._pretrained_artifact.meta()

    def head_prototypes(self, task: str, encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """Class prototypes ``(n_classes, output_dim)`` of ``task``'s frozen head from the pretrained
        encoder (mean L2-normalized feature of each class's canonical renderings, or of ``head_shots``
        training examples; see :class:`TinyBenchmarkConfig`), not centred."""
        enc = encoder if encoder is not None else self.new_encoder(self.pretrained_state())
        if self.config.heads == "canonical":
            images = torch.from_numpy(canonical_images(task))  # (C, V, 3, 32, 32) in [0, 1]
            n_classes, variants = images.shape[:2]
            feats = F.normalize(encode(enc, normalize_images(images.flatten(0, 1)), device=self.device), dim=-1)
            return feats.reshape(n_classes, variants, -1).mean(1)
        X, y = self.split(task, "train")
        rows = self.head_example_rows(task)
        return torch.stack([F.normalize(encode(enc, X[rows[y[rows] == c]], device=self.device), dim=-1).mean(0)
                            for c in range(len(TASK_CLASSES[task]))])

    def head_example_rows(self, task: str) -> torch.Tensor:
        """Rows ``(n,)`` int64 of ``task``'s training split that its frozen head was built from: none for
        canonical heads (they come from clean renderings); with ``heads="shots"``, the first
        ``head_shots`` of each class in a permutation seeded with 0, grouped by class. The one rule that
        :meth:`head_prototypes` builds from and that measurements on training data exclude
        (:func:`mergelab.analysis.generalization.head_example_indices`)."""
        if self.config.heads == "canonical":
            return torch.empty(0, dtype=torch.long)
        _, y = self.split(task, "train")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        return torch.cat([order[y[order] == c][: self.config.head_shots] for c in range(len(TASK_CLASSES[task]))])

    @property
    def heads(self) -> dict[str, ClassificationHead]:
        """Frozen per-task heads, built from the pretrained encoder before any fine-tuning (cached).

        Built on :attr:`train_threads` threads whoever calls: the prototypes' forward pass runs with
        autograd on, whose attention path splits its reductions by thread, and two threads give other last
        bits on some tasks (measured: counting and shapes). The heads' digests are in every run's cache
        key, so heads that followed the first process's threads made a chapter run alone (two threads)
        train other experts than the same chapter in the book (one)."""
        if self._heads is None:
            from .ship import shipped_heads, taken

            name = self.heads_name(cpu=True)  # the name the heads ship under, looked up on every device

            def build() -> tuple[StateDict, dict[str, Any]]:
                shipped = self._made_from_this_encoder(shipped_heads(self.shipped_encoder_key, name))
                if shipped is not None:  # the shipped encoder's heads as the shipped runs were trained with
                    return taken(shipped)
                enc = self.new_encoder(self.pretrained_state())
                with torch_threads(self.train_threads):  # the same prototypes in every process
                    protos = {task: self.head_prototypes(task, enc) for task in TASKS}
                return protos, {"heads": self.config.heads, "head_shots": self.config.head_shots,
                                "threads": self.train_threads}

            weights = Artifact(self.heads_path()).get_or_build(build)
            self._heads = {t: ClassificationHead(weights[t], self.config.logit_scale) for t in TASKS}
        return self._heads

    def heads_name(self, cpu: bool = False) -> str:
        """``heads-<canonical|shotsN>-threads<T>``: the heads' kind and the threads they were built on (a cache
        made before the heads were pinned to :attr:`train_threads` is rebuilt once), the name they ship under;
        ``-<device>`` after it where they are built on a GPU (unless ``cpu``: the name on the CPU)."""
        tag = "canonical" if self.config.heads == "canonical" else f"shots{self.config.head_shots}"
        device = "" if cpu or not self._device_part() else f"-{self.device.type}"
        return f"heads-{tag}-threads{self.train_threads}{device}"

    def heads_path(self) -> Path:
        """The cached heads' file, ``<heads_name()>-encoder<digest>.safetensors``.

        Named by the SHA-256 of the encoder file this data folder holds (its first 16 hex digits), not by the
        encoder's configuration only: an encoder built again at the same key with other bits (its file
        deleted and pretrained on another machine, or replaced by hand) gets heads of its own. Every run's
        key holds the heads' digests, so its experts are then trained again too, instead of being read from
        runs made from the old encoder. Loads (or builds) the pretrained encoder."""
        self.pretrained_state()
        return self.cache_dir / f"{self.heads_name()}-encoder{self.pretrained_sha256[:16]}.safetensors"

    def _made_from_this_encoder(self, shipped: Artifact | None) -> Artifact | None:
        """``shipped`` (heads or a run of :mod:`mergelab.benchmarks.tiny.ship`) when it was made from the encoder
        this data folder holds (the SHA-256 its log records), else ``None``: it is then made here."""
        if shipped is None:
            return None
        self.pretrained_state()
        return shipped if shipped.meta().get("pretrained_sha256") == self.pretrained_sha256 else None

    # ------------------------------------------------------------------ experts
    def finetune_encoder(self, encoder: torch.nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                         on_step: Callable[[int, torch.nn.Module], None] | None = None,
                         desc: str = "fine-tune", progress: bool | None = None) -> dict[str, list[float]]:
        """Fine-tune ``encoder`` in place on the training split of ``tasks`` with their frozen heads.

        The loop behind :meth:`expert` and :meth:`multitask` (:func:`mergelab.training.finetune`), for
        callers that watch the run: ``on_step(step, model)`` after every optimizer step (sweeps save
        checkpoints and probe gradients there). Trains on :attr:`train_threads` torch threads, whoever calls.
        Returns ``{"loss": [...], "lr": [...]}`` per step.
        """
        with torch_threads(self.train_threads):
            return finetune(encoder, {t: self.split(t, "train") for t in tasks}, {t: self.heads[t] for t in tasks},
                            cfg, device=self.device, desc=desc,
                            progress=self.progress if progress is None else progress, on_step=on_step)

    def head_digest(self, task: str) -> str:
        """Hash of a task's head weights and scale: part of every cache key that depends on the head."""
        return self.heads[task].digest()

    def check_task(self, task: str) -> str:
        """``task`` if the tiny benchmark has it, else an error listing the tasks."""
        return check_tiny_task(task)

    def shipped_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> Artifact | None:
        """The run ``(kind, tasks, cfg)`` shipped with mergelab (:mod:`mergelab.benchmarks.tiny.ship`), if one
        has this run key and was made from the encoder this data folder holds (the shipped one, by its
        SHA-256); else ``None``: the run is trained here."""
        from .ship import shipped_run

        return self._made_from_this_encoder(shipped_run(kind, self.run_key(kind, tasks, cfg, parts={})))

    def _run_key_parts(self, tasks: Sequence[str]) -> dict[str, Any]:
        """The device, where it is not the CPU (:meth:`_device_part`): a run trained on a GPU has other weights. The
        shipped runs are looked up by their CPU keys on every device (:meth:`shipped_run`)."""
        return self._device_part()

    def _train_cached(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> StateDict:
        from .ship import ENV_FINETUNE, requested

        if requested(ENV_FINETUNE):
            artifact = self.run_artifact(kind, tasks, cfg)
            if artifact.exists() and artifact.meta().get("shipped"):
                raise ValueError(f"{ENV_FINETUNE}=1 asks to fine-tune here, but {artifact.path.parent} holds the shipped "
                                 f"{kind} {artifact.path.stem}, and evaluations may have been made from it: remove the "
                                 "caches (`make clean-cache`, or point MERGELAB_DATA_DIR at an empty folder), then run "
                                 "again.")
        return super()._train_cached(kind, tasks, cfg)

    def _train_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, artifact: Artifact
                   ) -> tuple[StateDict, dict[str, Any]]:
        """Fine-tune a fresh copy of the pretrained encoder on ``tasks``; ``(weights, log)``. Where mergelab
        ships this run (:meth:`shipped_run`), its weights and training log, marked ``"shipped": True``,
        instead."""
        from .ship import taken

        shipped = self.shipped_run(kind, tasks, cfg)
        if shipped is not None:
            return taken(shipped)
        enc = self.new_encoder(self.pretrained_state())
        start = time.perf_counter()
        history = self.finetune_encoder(enc, tasks, cfg,
                                        desc=f"{kind} {'+'.join(tasks) if len(tasks) < 3 else f'{len(tasks)} tasks'}")
        state = {k: v.detach().cpu() for k, v in enc.state_dict().items()}
        return state, {"kind": kind, "tasks": list(tasks), "benchmark": "tiny", "benchmark_key": self.key,
                       "finetune": recipe_fields(cfg), "loss": history["loss"], "lr": history["lr"],
                       "wall_time_s": time.perf_counter() - start, "device": str(self.device)}

    # ------------------------------------------------------------------ evaluation (cached: BenchmarkBase.evaluations)
    EVAL_BATCH_SIZE = 128
    """Images per forward pass when evaluating: a batch's activations then stay in the core's cache (one
    thread, this size's encoder: about 6,600 images per second against 5,300 at 1000, measured); the
    features are bit-identical whatever the batch."""

    @property
    def eval_batch_size(self) -> int:
        """Images per forward pass of every evaluation (:data:`EVAL_BATCH_SIZE`)."""
        return self.EVAL_BATCH_SIZE

    def check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not valid; use one of {', '.join(SPLITS)}.")
        return split

    def _eval_key(self, task: str, split: str) -> str:
        return config_hash({"task": task, "split": split, "benchmark": self.key, "head": self.head_digest(task),
                            "batch_size": self.EVAL_BATCH_SIZE, "device": self.device.type,
                            **codeversion.key_part("evaluation")})

    def _eval_encoder_for(self, state: StateDict) -> torch.nn.Module:
        return load_encoder_state(self._encoder, state).to(self.device).eval()

    def _evaluate_task(self, encoder: torch.nn.Module, task: str, split: str) -> tuple[int, float, int]:
        X, y = self.split(task, split)
        head = self.heads[task].to(self.device)
        correct, losses, bs = 0, [], self.EVAL_BATCH_SIZE
        for i in range(0, len(y), bs):
            logits, labels = head(self.eval_features(encoder, X[i:i + bs].to(self.device))), y[i:i + bs].to(self.device)
            correct += int((logits.argmax(-1) == labels).sum())
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
        # summed once, in float64: the same number whatever the batch size
        return correct, float(torch.cat(losses).double().sum()) if losses else 0.0, len(y)
