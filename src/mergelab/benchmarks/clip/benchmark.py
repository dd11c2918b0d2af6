"""The ``clip`` benchmark: open_clip image towers on the 8 vision tasks, with the ``tiny`` interface.

:class:`ClipBenchmark` offers what notebooks use on :class:`mergelab.benchmark.TinyBenchmark`:

* ``tasks``; ``split(task, split) -> (images, y)`` (``images`` is a lazy :class:`ImageView`),
  ``raw_images``, ``class_names``, ``dataset``/``dataloader`` for streaming;
* ``pretrained_state()``; ``heads[task]`` (zero-shot heads, cached per task);
* ``expert(task, FinetuneConfig)`` fine-tuned with the given recipe (default: the public one,
  :data:`PUBLIC_RECIPE`), resumable, cached; or imported from a folder of checkpoints
  (``model.experts_dir``); ``experts``, ``multitask``, ``import_experts``; ``finetune_encoder``,
  the training loop behind them, for sweeps that watch a run step by step;
* ``evaluate(state, split, tasks) -> {task: accuracy}`` and ``evaluate_loss``: batched, DataLoader
  workers, mixed precision on GPU, cached per (state hash, task, split).

Caches live under ``<data>/clip/<model>-<tag>-<hash>/``: the pretrained image tower, heads, experts
(``experts/``, with ``*.partial.pt`` checkpoints while training) and evaluations (``eval/``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ... import codeversion, paths
from ...cache import Artifact
from ..base import BenchmarkBase
from ...models import ClassificationHead, load_encoder_state
from ...training import FinetuneConfig, recipe_fields, training_indices
from ...utils import (StateDict, atomic_save_safetensors, atomic_write_json, clone_state_dict, config_hash,
                     load_safetensors, pick_device)
from . import datasets as ds
from .training import finetune_encoder
from .checkpoints import (check_release_base, find_expert_checkpoint, find_release_head, load_expert,
                          read_release_head)
from .model import (amp_dtype, autocast, check_model_name, create_clip, model_arch_options,
                    zero_shot_weights)

from .config import (  # noqa: F401  (the configuration, re-exported here)
    PUBLIC_EPOCHS,
    PUBLIC_RECIPE,
    ClipBenchmarkConfig,
    ClipDataConfig,
)


class Compose8:
    """``transform`` then ``[0, 1]`` floats to ``uint8`` (exact for 8-bit images); picklable for workers."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return (self.transform(image) * 255).round().clamp(0, 255).to(torch.uint8)


class ClipBenchmark(BenchmarkBase):
    """The 8-task open_clip benchmark, with the same interface as the ``tiny`` one.

    Args:
        config: the benchmark's definition.
        device: ``"auto"`` (GPU when there is one), ``"cpu"``, ``"cuda"``...
        progress: show progress bars for long steps.
    """

    default_recipe = PUBLIC_RECIPE
    """Experts and the multi-task model train with the public recipe unless told otherwise."""

    name = "clip"
    """The benchmark's size, as ``mergelab.load_benchmark`` names it."""

    def __init__(self, config: ClipBenchmarkConfig | None = None, device: str | None = "auto",
                 progress: bool = True) -> None:
        self.config = config or ClipBenchmarkConfig()
        self.device = pick_device(device)
        self.progress = progress
        self.tasks: tuple[str, ...] = self.config.tasks
        self.amp = amp_dtype(self.device, self.config.model.precision)
        check_model_name(self.config.model.name)
        model_arch_options(self.config.model)  # an unknown pretrained tag fails here, not later
        self._root: Path | None = None
        self._sources: dict[str, ds.TaskSource] = {}
        self._splits: dict[tuple[str, str], ds.TaskSplit] = {}
        self._loaders: dict[tuple[str, str], DataLoader] = {}
        self._encoder: nn.Module | None = None  # the pretrained tower (never modified)
        self._eval_encoder: nn.Module | None = None  # a copy on ``device`` that evaluation loads states into
        self._pretrained: StateDict | None = None
        self._heads: dict[str, ClassificationHead] = {}
        self._preprocess: tuple[Any, Any] | None = None
        self._imported: dict[str, StateDict] = {}
        self._bases_compared: set[Path] = set()  # releases' pretrained models found equal to ours
        self._image_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._subset_cache: dict[tuple[str, str, str], torch.Tensor] = {}
        self._cache_bytes = 0

    # ------------------------------------------------------------------ identity and caches
    @property
    def key(self) -> str:
        """Hash of the pretrained model's identity (name, tag or init seed, MLP activation)."""
        return config_hash({"benchmark": "clip", **self.config.model.identity()})

    @property
    def activation(self) -> str:
        """The MLP activation of the model (``"QuickGELU"`` for OpenAI's weights): part of every cache key."""
        return self.config.model.identity()["activation"]

    @property
    def precision(self) -> str:
        """The arithmetic of fine-tuning and evaluation on this device: ``"fp32"``, ``"bf16"`` or ``"fp16"``
        (``model.precision`` resolved; ``"auto"`` depends on the GPU): part of expert and evaluation keys."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]

    @property
    def cache_dir(self) -> Path:
        model = self.config.model
        tag = "file" if model.pretrained_file else (model.pretrained or "random")  # a file by its bytes (the key)
        path = paths.data_dir() / "clip" / f"{self.config.model.name}-{tag}-{self.key}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def experts_dir(self) -> Path:
        path = self.cache_dir / "experts"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def eval_batch_size(self) -> int:
        """Images per forward pass of every evaluation: ``data.eval_batch_size``."""
        return self.config.data.eval_batch_size

    @property
    def micro_batch_size(self) -> int:
        """Training loops that take whole splits in one batch (full-batch gradient descent) forward at
        most this many images at once and accumulate gradients: ``data.eval_batch_size``."""
        return self.config.data.eval_batch_size

    @property
    def data_root(self) -> Path:
        if self._root is None:
            self._root = self.config.data.resolve_root()
        return self._root

    # ------------------------------------------------------------------ data
    def source(self, task: str) -> ds.TaskSource:
        task = ds.check_task(task)
        if task not in self._sources:
            self._sources[task] = ds.load_source(task, self.data_root)
        return self._sources[task]

    def class_names(self, task: str) -> list[str]:
        """Class names of ``task`` in label order (the words the zero-shot head was built from)."""
        return list(self.source(task).class_names)

    def dataset(self, task: str, split: str = "train", train_transform: bool = False) -> ds.TaskSplit:
        """``split`` of ``task`` as a Dataset of ``(normalized image (3, S, S), label)``.

        ``train_transform`` uses the model's training preprocessing (random resized crop), as the
        public recipe does while fine-tuning; otherwise resize, centre crop, normalize.
        """
        task, split = ds.check_task(task), ds.check_split(split)
        if (task, split) not in self._splits:
            self._splits[task, split] = ds.make_split(self.source(task), split, self.config.data.limit(split))
        pre_train, pre_val = self.preprocess
        return self._splits[task, split].with_transform(pre_train if train_transform else pre_val)

    def split(self, task: str, split: str = "train") -> tuple[ds.ImageView, torch.Tensor]:
        """``(images, y)``: lazy normalized images (``images[i]``, ``images[a:b]``) and ``(N,)`` int64 labels."""
        d = self.dataset(task, split)
        return ds.ImageView(d), torch.from_numpy(d.labels.copy())

    def images(self, task: str, split: str, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Normalized images ``(len(indices), 3, S, S)`` float32 on the CPU: rows ``indices`` of
        ``split``, the same values as ``self.split(task, split)[0][indices]``.

        Decoded by the loader's workers to ``uint8`` (as in evaluation) and kept in memory within
        ``data.eval_cache_gb`` (shared with the cached ``val`` splits), so that measurements that come
        back to the same examples (every merge of the stability sweep measures its tasks on the same
        subsets) decode them once. ``uint8`` holds them in a quarter of the memory of the floats.
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        task, split = ds.check_task(task), ds.check_split(split)
        key = (task, split, hashlib.sha256(idx.numpy().tobytes()).hexdigest()[:24])
        X8 = self._subset_cache.get(key)
        if X8 is None:
            side = self._image_side()
            loader = DataLoader(torch.utils.data.Subset(self._uint8_dataset(task, split), idx.tolist()),
                                shuffle=False, batch_size=self.config.data.eval_batch_size,
                                num_workers=self.config.data.num_workers if len(idx) else 0)
            parts = [x for x, _ in loader]
            X8 = torch.cat(parts) if parts else torch.empty(0, 3, side, side, dtype=torch.uint8)
            if self._fits_in_cache(X8.numel()):
                self._subset_cache[key] = X8
                self._cache_bytes += X8.numel()
        return self._normalized(X8, *self._normalization())

    def raw_images(self, task: str, split: str = "train") -> ds.ImageView:
        """Images in ``[0, 1]`` after resize and centre crop, for display: ``view[:8]`` is ``(8, 3, S, S)``."""
        return ds.ImageView(self.dataset(task, split).with_transform(self._display_transform()))

    def _display_transform(self) -> Any:
        from torchvision.transforms import Compose, Normalize

        _, pre_val = self.preprocess
        return Compose([t for t in pre_val.transforms if not isinstance(t, Normalize)])

    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the evaluation transform, shaped ``(1, 3, 1, 1)``."""
        from torchvision.transforms import Normalize

        _, pre_val = self.preprocess
        norm = next(t for t in pre_val.transforms if isinstance(t, Normalize))
        return (torch.tensor(norm.mean, dtype=torch.float32).reshape(1, -1, 1, 1),
                torch.tensor(norm.std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def _uint8_dataset(self, task: str, split: str) -> ds.TaskSplit:
        """``split`` of ``task`` decoded, resized and cropped to ``uint8`` ``(3, S, S)`` images (exactly
        what the evaluation transform produces before normalizing: PIL images are 8-bit)."""
        return self.dataset(task, split).with_transform(Compose8(self._display_transform()))

    @staticmethod
    def _normalized(X8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``uint8`` images to the evaluation transform's normalized floats, on ``mean``'s device."""
        return (X8.to(mean.device, non_blocking=True).float() / 255 - mean) / std

    def _fits_in_cache(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more decoded images stay within ``data.eval_cache_gb``."""
        return self._cache_bytes + nbytes <= self.config.data.eval_cache_gb * 2**30

    def _eval_batches(self, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized evaluation batches on ``device``.

        Workers decode, resize and crop to ``uint8`` (exactly what the evaluation transform
        produces before normalizing: PIL images are 8-bit); normalization runs on ``device``. The
        ``val`` split of a task is kept in memory as ``uint8`` when it fits in ``data.eval_cache_gb``,
        so a coefficient sweep decodes its images once.
        """
        mean, std = (t.to(self.device) for t in self._normalization())
        cached = self._image_cache.get((task, split))
        if cached is None:
            size = len(self.dataset(task, split)) * 3 * self._image_side() ** 2
            keep = split == "val" and self._fits_in_cache(size)
            loader = self._loaders.get((task, split))
            if loader is None:
                workers = self.config.data.num_workers
                # val loaders that cannot be cached keep their workers between the evaluations of a sweep
                persistent = workers > 0 and split == "val" and not keep
                loader = DataLoader(
                    self._uint8_dataset(task, split),
                    batch_size=self.config.data.eval_batch_size, shuffle=False, num_workers=workers,
                    pin_memory=self.device.type == "cuda", persistent_workers=persistent)
                if persistent:
                    self._loaders[task, split] = loader
            parts: list[tuple[torch.Tensor, torch.Tensor]] = []
            for X8, y in loader:
                if keep:
                    parts.append((X8, y))
                yield self._normalized(X8, mean, std), y.to(self.device)
            if keep and parts:
                self._image_cache[task, split] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
                self._cache_bytes += size
            return
        X8, y = cached
        bs = self.config.data.eval_batch_size
        for i in range(0, len(y), bs):
            yield self._normalized(X8[i:i + bs], mean, std), y[i:i + bs].to(self.device)

    def _image_side(self) -> int:
        self.preprocess  # noqa: B018 - loads the model
        size = getattr(self._encoder, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    # ------------------------------------------------------------------ the pretrained model and heads
    def _load(self, tasks: Iterable[str]) -> None:
        """Load the pretrained tower, transforms and the heads of ``tasks``, building and caching what is missing.

        The full model (with its text tower) is only created when the image tower or a head is not
        cached yet; it is dropped once the heads are built.
        """
        tasks = [ds.check_task(t) for t in tasks]
        visual_path = self.cache_dir / "pretrained_visual.safetensors"
        missing = [t for t in tasks if t not in self._heads and not self._head_path(t).is_file()]
        if self._encoder is not None and not missing:
            for t in tasks:
                self._heads.setdefault(t, self._read_head(t))
            return
        need_full = bool([t for t in missing if t not in self._release_head_tasks(missing)]) or not visual_path.is_file()
        model, pre_train, pre_val, tokenizer = create_clip(self.config.model, load_weights=bool(need_full))
        released = self._release_heads(missing)
        missing = [t for t in missing if t not in released]
        for t, (weight, scale, source) in released.items():
            atomic_save_safetensors(self._head_path(t), {"weight": weight}, metadata={
                "logit_scale": repr(scale), "task": t, "source": str(source)})
        if need_full:
            start = time.perf_counter()
            for t in tqdm(missing, desc="zero-shot heads", disable=not self.progress, leave=False):
                weight = zero_shot_weights(model, tokenizer, self.class_names(t), ds.TEMPLATES[t], self.device)
                atomic_save_safetensors(self._head_path(t), {"weight": weight}, metadata={
                    "logit_scale": repr(float(model.logit_scale.detach().exp())), "task": t,
                    "class_names": json.dumps(self.class_names(t)), "templates": json.dumps(ds.TEMPLATES[t])})
            if not visual_path.is_file():
                atomic_save_safetensors(visual_path, model.visual.state_dict())
                atomic_write_json(visual_path.with_suffix(".json"), {
                    "model": self.config.model.identity(), "wall_time_s": time.perf_counter() - start})
        encoder = model.visual
        del model  # the text tower is not needed any more
        self._pretrained = {k: v.float() if torch.is_floating_point(v) else v
                            for k, v in load_safetensors(visual_path).items()}
        self._encoder = load_encoder_state(encoder.float().cpu(), self._pretrained).eval()
        self._preprocess = (pre_train, pre_val)
        for t in tasks:
            self._heads[t] = self._read_head(t)

    def _release_head_tasks(self, tasks: Sequence[str]) -> list[str]:
        folder = self.config.model.experts_folder()
        return [t for t in tasks if folder is not None and find_release_head(folder, t) is not None]

    def _release_heads(self, tasks: Sequence[str]) -> dict[str, tuple[torch.Tensor, float, Path]]:
        """Heads shipped with imported experts (a task-vector release's ``head_<Task>.pt`` beside them):
        the experts were fine-tuned against those heads, so they are scored with them."""
        folder = self.config.model.experts_folder()
        out = {}
        for t in self._release_head_tasks(tasks):
            path = find_release_head(folder, t)
            weight, scale = read_release_head(path, len(self.class_names(t)), self.config.model.allow_pickle)
            out[t] = (weight, scale, path)
        return out

    def _head_key(self, task: str) -> str:
        """Cache key of a head: task, class names, templates and the text tower's activation; for a head
        shipped with imported experts, the digest of that file instead."""
        folder = self.config.model.experts_folder()
        release = find_release_head(folder, task) if folder is not None else None
        if release is not None:
            return config_hash({"task": task, "release_head": hashlib.sha256(release.read_bytes()).hexdigest()})
        return config_hash({"task": task, "class_names": self.class_names(task), "templates": ds.TEMPLATES[task],
                            "activation": self.activation, "device": self.device.type,  # the text tower's arithmetic
                            **codeversion.key_part("evaluation")})

    def _head_path(self, task: str) -> Path:
        return self.cache_dir / "heads" / f"{task}-{self._head_key(task)}.safetensors"

    def _read_head(self, task: str) -> ClassificationHead:
        from safetensors import safe_open

        path = self._head_path(task)
        with safe_open(str(path), framework="pt") as f:
            scale = float(f.metadata()["logit_scale"])
            weight = f.get_tensor("weight")
        return ClassificationHead(weight, scale)

    @property
    def preprocess(self) -> tuple[Any, Any]:
        """``(train transform, evaluation transform)`` of the model."""
        if self._preprocess is None:
            self._load(self.tasks)
        assert self._preprocess is not None
        return self._preprocess

    def pretrained_state(self) -> StateDict:
        """The pretrained image tower's state dict (a copy, fp32, CPU)."""
        if self._pretrained is None:
            self._load(self.tasks)
        assert self._pretrained is not None
        return clone_state_dict(self._pretrained)

    def pretraining_log(self) -> dict[str, Any]:
        """What the ``tiny`` benchmark's pretraining log gives; here no pretraining runs (empty loss curve)."""
        cfg = self.config.model
        return {"loss": [], "wall_time_s": 0.0,
                "source": f"open_clip {cfg.name} pretrained={cfg.pretrained!r}"
                          + (" (random initialization)" if cfg.pretrained is None else "")}

    @property
    def heads(self) -> dict[str, ClassificationHead]:
        """Frozen zero-shot heads of the benchmark's tasks (cached per task)."""
        if any(t not in self._heads for t in self.tasks):
            self._load(self.tasks)
        return {t: self._heads[t] for t in self.tasks}

    def head(self, task: str) -> ClassificationHead:
        """The zero-shot head of any of the 8 tasks (built on first use)."""
        task = ds.check_task(task)
        if task not in self._heads:
            self._load([task])
        return self._heads[task]

    def head_digest(self, task: str) -> str:
        """Hash of a task's head (:meth:`ClassificationHead.digest`): part of the cache keys."""
        return self.head(task).digest()

    def new_encoder(self, state: StateDict | None = None) -> nn.Module:
        """A fresh image tower on the CPU: the pretrained one, or loaded with ``state`` when given."""
        if self._encoder is None:
            self._load(self.tasks)
        enc = copy.deepcopy(self._encoder)
        return load_encoder_state(enc, state) if state is not None else enc

    # ------------------------------------------------------------------ experts
    def import_experts(self, folder: str | Path, tasks: Iterable[str] | None = None) -> dict[str, StateDict]:
        """Image-tower state dicts of existing experts in ``folder``, one per task (see
        :mod:`mergelab.benchmarks.clip.checkpoints` for the accepted files); checked against the pretrained tower.
        Pickled modules are read only with ``model.allow_pickle: true``."""
        reference = self.pretrained_state()
        out = {}
        for t in tasks or self.tasks:
            t = ds.check_task(t)
            out[t] = load_expert(find_expert_checkpoint(folder, t), reference, self.config.model.allow_pickle)
        return out

    def _run_key_parts(self, tasks: Sequence[str]) -> dict[str, Any]:
        """Besides the benchmark, tasks, heads and recipe, a clip run is keyed by the model's activation,
        the precision it trains in, the training data's fingerprint and the DataLoader's worker count (each worker
        draws its own augmentation seeds, so another count gives other crops, hence other weights)."""
        return {"activation": self.activation, "precision": self.precision,
                "data": [self._splits_fingerprint(t, "train") for t in tasks],
                "num_workers": self.config.data.num_workers}

    def check_task(self, task: str) -> str:
        """``task`` if the clip size has it, else an error listing the tasks."""
        return ds.check_task(task)

    def _splits_fingerprint(self, task: str, split: str) -> str:
        self.dataset(task, split)  # makes the split once; its fingerprint is kept on it, not on the copies
        return self._splits[ds.check_task(task), split].fingerprint()

    def _train_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, artifact: Artifact
                   ) -> tuple[StateDict, dict[str, Any]]:
        start = time.perf_counter()
        enc = self.new_encoder(self.pretrained_state())
        history = self.finetune_encoder(enc, tasks, cfg, partial=self._resume_point(artifact),
                                        desc=f"{kind} {'+'.join(tasks) if len(tasks) < 3 else f'{len(tasks)} tasks'}")
        state = {k: v.detach().float().cpu() for k, v in enc.state_dict().items()}
        return state, {
            "kind": kind, "tasks": list(tasks), "benchmark": "clip", "benchmark_key": self.key,
            "model": self.config.model.identity(), "finetune": recipe_fields(cfg), "loss": history["loss"],
            "lr": history["lr"], "wall_time_s": time.perf_counter() - start + history.get("resumed_wall_s", 0.0),
            "resumed_at_step": history.get("resumed_at_step", 0), "device": str(self.device),
            "precision": str(self.amp), "train_examples": {t: len(self.dataset(t, "train")) for t in tasks}}

    @staticmethod
    def _resume_point(artifact: Artifact) -> Path:
        """Where an interrupted run of ``artifact`` keeps its resume point."""
        return artifact.path.with_suffix(".partial.pt")

    def _after_run(self, artifact: Artifact) -> None:
        self._resume_point(artifact).unlink(missing_ok=True)

    def finetune_encoder(self, encoder: nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                         on_step: Callable[[int, nn.Module], None] | None = None, desc: str = "fine-tune",
                         progress: bool | None = None, partial: Path | None = None) -> dict[str, Any]:
        """Fine-tune ``encoder`` (an image tower, in place) on ``tasks`` (one batch of each per step,
        losses summed), heads frozen: the loop behind :meth:`expert` and :meth:`multitask`.

        Training images go through the model's training transform (random resized crop), batches
        through DataLoader workers, the forward pass under mixed precision on GPU (``model.precision``).
        ``on_step(step, model)`` is called after every optimizer step (``step`` counts from 1; sweeps
        save checkpoints and probe gradients there). With ``partial``, a resumable checkpoint is saved
        every ``checkpoint_every`` steps and the run resumes from it when it exists: the encoder,
        optimizer, loss scaler, step, history and the CPU random state. Batches are a function of
        (seed, step) (:class:`~mergelab.benchmarks.clip.training.StepBatchSampler`), so a resumed run
        sees the same batches, and with a constant learning rate the first ``s`` steps of a run are the run of ``s`` steps; with
        ``data.num_workers = 0`` augmentations, hence weights, are identical too (worker processes
        draw their own augmentation seeds). Returns ``{"loss": [...], "lr": [...], "grad_norm": [...]}``
        per step (``grad_norm``: the gradient's norm before clipping, when ``cfg.grad_clip > 0``; and
        ``resumed_at_step``, ``resumed_wall_s`` after a resume); leaves ``encoder`` in eval mode.
        """
        return finetune_encoder(self, encoder, tasks, cfg, on_step=on_step, desc=desc, progress=progress,
                                partial=partial)

    def _imported_expert(self, task: str) -> StateDict | None:
        """With ``model.experts_dir`` (or ``$MERGELAB_CLIP_EXPERTS_DIR``) set, experts are imported from
        that folder instead of trained, whatever the recipe."""
        folder = self.config.model.experts_folder()
        if folder is None:
            return None
        if task not in self._imported:
            self._check_importable_split(task)
            base = check_release_base(folder, task, self.pretrained_state(), self.config.model.allow_pickle,
                                      already=self._bases_compared)
            if base is not None:
                self._bases_compared.add(base)
            self._imported[task] = self.import_experts(folder, [task])[task]
        return clone_state_dict(self._imported[task])

    def _check_importable_split(self, task: str) -> None:
        """Refuse to import an expert whose task this benchmark would test on its own split of the images (EuroSAT
        without ``EuroSAT_splits/``): an expert trained elsewhere saw most of those test and validation images."""
        try:
            own = self.source(task).own_split
        except ds.DatasetNotFoundError:
            return  # no data yet: evaluating will say where it was looked for
        if own:
            raise ValueError(
                f"model.experts_dir imports a {task} expert, but {self.data_root}/EuroSAT_splits is missing, so "
                f"{task} would be split here by mergelab's own seeded rule, and about 80 % of its test and validation "
                "images would be ones the imported expert (trained on the public benchmark's EuroSAT_splits/train) "
                "saw in training. Put the EuroSAT_splits folder the experts were trained with under the data root "
                "(docs/clip.md), leave EuroSAT out of tasks, or unset model.experts_dir to fine-tune the experts here.")

    def _imported_log(self, task: str) -> dict[str, Any] | None:
        folder = self.config.model.experts_folder()
        if folder is None:
            return None
        return {"kind": "imported", "task": task, "checkpoint": str(find_expert_checkpoint(folder, task))}

    def expert_recipe(self, task: str, cfg: FinetuneConfig | None = None) -> FinetuneConfig:
        """The recipe an expert on ``task`` trains with: ``cfg`` (default :data:`PUBLIC_RECIPE`), with
        ``num_steps = epochs * ceil(n_train / batch_size)`` when ``data.train_epochs`` sets the epochs
        and ``cfg`` is the public recipe (any ``num_steps`` and ``seed``); other recipes, such as a
        sweep's, keep their ``num_steps``. ``n_train``: the examples the run trains on."""
        cfg = cfg or self.default_recipe
        epochs = self.config.data.epochs(ds.check_task(task))
        if epochs is None or replace(cfg, num_steps=PUBLIC_RECIPE.num_steps, seed=PUBLIC_RECIPE.seed) != PUBLIC_RECIPE:
            return cfg  # the public epochs belong to the public recipe; other recipes (sweeps) keep num_steps
        n = len(training_indices(len(self.dataset(task, "train")), cfg))
        steps = epochs * -(-n // cfg.batch_size)
        return replace(cfg, num_steps=steps, warmup_steps=min(cfg.warmup_steps, steps))

    # ------------------------------------------------------------------ evaluation
    def _eval_key(self, task: str, split: str) -> str:
        return config_hash({"task": task, "split": split, "head": self.head_digest(task),
                            "activation": self.activation, "data": self._splits_fingerprint(task, split),
                            "amp": str(self.amp), "device": self.device.type,
                            "batch_size": self.config.data.eval_batch_size, **codeversion.key_part("evaluation")})

    def check_split(self, split: str) -> str:
        return ds.check_split(split)

    def _eval_encoder_for(self, state: StateDict) -> nn.Module:
        if self._eval_encoder is None:
            self._eval_encoder = self.new_encoder().to(self.device).eval()
        return load_encoder_state(self._eval_encoder, {k: v.to(self.device) for k, v in state.items()})

    def eval_features(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Features ``(n, d)`` float32 of a batch on :attr:`device`, under ``model.precision``'s autocast."""
        with autocast(self.device, self.amp):
            return encoder(images).float()

    def _evaluate_task(self, encoder: nn.Module, task: str, split: str) -> tuple[int, float, int]:
        head = self.head(task).to(self.device)
        correct, total_loss, n = 0, 0.0, 0
        for X, y in self._eval_batches(task, split):
            logits = head(self.eval_features(encoder, X))
            correct += int((logits.argmax(-1) == y).sum())
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return correct, total_loss, n


def load_clip_benchmark(device: str | None = "auto", progress: bool = True, **params: Any) -> ClipBenchmark:
    """:class:`ClipBenchmark` from plain parameters (``tasks``, ``data``, ``model``, ...), as
    :func:`mergelab.load_benchmark` passes them."""
    return ClipBenchmark(ClipBenchmarkConfig.from_params(**params), device=device, progress=progress)
