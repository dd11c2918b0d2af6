"""The benchmark interface every size implements (``tiny``, ``clip``), declared in full.

A benchmark owns the tasks' data, the pretrained encoder, one frozen classification head per task,
the cached experts and the evaluation. :class:`BenchmarkBase` holds what every size does the same way
(cached experts and multi-task models, run keys, logs). Everything above it (training sweeps, trajectories, analyses,
chapters) talks to it through this protocol only, so a new size is one class that satisfies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from .. import codeversion
from ..cache import Artifact
from ..training import FinetuneConfig, recipe_fields
from ..utils import task_names  # noqa: F401 (the sizes' API, defined beside the other checks)
from ..utils import StateDict, atomic_write_json, config_hash, read_json, state_digest


@runtime_checkable
class Benchmark(Protocol):
    """What a benchmark offers. Shapes: images ``(N, 3, H, W)`` float32, labels ``(N,)`` int64."""

    tasks: tuple[str, ...]
    """Task names, in the benchmark's order."""
    device: torch.device
    """Where models are trained and evaluated."""
    progress: bool
    """Whether long steps show progress bars."""
    micro_batch_size: int | None
    """Examples per forward pass inside a batch (memory only; ``None``: the whole batch)."""

    @property
    def key(self) -> str:
        """A digest of everything that makes the pretrained model and the heads (cache key part)."""

    @property
    def experts_dir(self) -> Path:
        """Folder of cached experts (``expert-<run key>.safetensors`` + JSON)."""

    @property
    def heads(self) -> dict[str, torch.nn.Module]:
        """Task name to its frozen classification head (features ``(N, d)`` to logits ``(N, C_t)``)."""

    def class_names(self, task: str) -> list[str]:
        """The task's class names, index = label."""

    def split(self, task: str, split: str = "train") -> tuple[Any, torch.Tensor]:
        """``(images or an indexable view of them, labels (N,))`` of one split: train, val or test."""

    def images(self, task: str, split: str, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` of a split, ready for the encoder: ``(n, 3, H, W)``."""

    def new_encoder(self, state: StateDict | None = None) -> torch.nn.Module:
        """A fresh encoder on :attr:`device`, with ``state`` loaded (default: the pretrained one)."""

    def pretrained_state(self) -> StateDict:
        """``theta_0``, the pretrained encoder's state dict (on the CPU)."""

    def head_digest(self, task: str) -> str:
        """A digest of the task's head (part of every cache key that depends on it)."""

    def run_key(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, parts: Mapping[str, Any] | None = None
                ) -> str:
        """The cache key of a fine-tuning run: ``kind`` (expert, multitask), its tasks, its config."""

    def finetune_encoder(self, encoder: torch.nn.Module, tasks: Sequence[str], cfg: FinetuneConfig,
                         on_step: Callable[[int, torch.nn.Module], None] | None = None) -> list[float]:
        """Fine-tune ``encoder`` in place on ``tasks`` (heads frozen); the loss per step."""

    def expert(self, task: str, cfg: FinetuneConfig | None = None) -> StateDict:
        """The expert of ``task`` trained with ``cfg`` (cached by configuration)."""

    def experts(self, cfg: FinetuneConfig | None = None, tasks: Iterable[str] | None = None
                ) -> dict[str, StateDict]:
        """:meth:`expert` of every task."""

    def multitask(self, cfg: FinetuneConfig | None = None, tasks: Iterable[str] | None = None) -> StateDict:
        """One encoder fine-tuned on all ``tasks`` at once (the multi-task upper reference)."""

    def evaluate(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None
                 ) -> dict[str, float]:
        """Top-1 accuracy (fraction 0..1) of the encoder ``state`` on each task, with the task's own head."""

    def evaluation_key(self, task: str, split: str) -> str:
        """What decides one task's result on ``split`` besides the weights (head, data, arithmetic)."""

    def eval_features(self, encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Features ``(n, d)`` float32 of a batch in the arithmetic of :meth:`evaluate`."""


def config_from(cls: type, what: str, values: Mapping[str, Any] | None, size: str) -> Any:
    """``cls(**values)`` for a dataclass of a benchmark's parameters (``values`` as a parameter file gives them;
    ``None``: the defaults), with a clear error naming a key it does not have and the valid ones."""
    if values is not None and not isinstance(values, Mapping):
        raise ValueError(f"{what}={values!r} is not valid for the {size} benchmark; give a mapping of its keys "
                         f"({', '.join(f.name for f in dataclasses.fields(cls))}).")
    values = dict(values or {})
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{what} parameter {unknown[0]!r} is not valid for the {size} benchmark; valid: "
                         f"{', '.join(valid)}.")
    return cls(**values)


class BenchmarkBase:
    """Cached fine-tuning every size shares: experts, the multi-task model, their logs and cache keys.

    A size subclasses it and provides :attr:`key`, :attr:`experts_dir`, :meth:`head_digest`,
    :meth:`check_task`, :meth:`new_encoder`, :meth:`pretrained_state` and :meth:`_train_run` (its
    training loop, returning the weights and the run's log); it may add parts to the run key
    (:meth:`_run_key_parts`), map a recipe per task (:meth:`expert_recipe`) and import experts instead
    of training them (:meth:`_imported_expert`). Experts are cached through
    :class:`mergelab.cache.Artifact` as ``<experts_dir>/<kind>-<run key>.safetensors`` + JSON.

    Evaluation is shared too: a size provides :meth:`check_split`, :attr:`cache_dir`,
    :meth:`_eval_key` (what decides a result besides the weights), :meth:`_eval_encoder_for` (the
    weights loaded on the device) and :meth:`_evaluate_task` (one task's pass); :meth:`evaluations`
    caches each result by the weights' digest, so evaluating the same weights again reads it.
    """

    tasks: tuple[str, ...]
    progress: bool
    default_recipe: FinetuneConfig = FinetuneConfig()
    """The recipe of :meth:`expert` and :meth:`multitask` when none is given."""
    train_threads: int | None = None
    """Torch threads every fine-tuning run of this size trains with, whatever the process's setting
    (part of every run key when set); ``None``: as the process is set (the clip size, on a GPU)."""

    # ------------------------------------------------------------------ what a size provides
    key: str
    experts_dir: Path

    def head_digest(self, task: str) -> str:  # pragma: no cover - every size implements it
        raise NotImplementedError

    def check_task(self, task: str) -> str:  # pragma: no cover - every size implements it
        raise NotImplementedError

    def _train_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, artifact: Artifact
                   ) -> tuple[StateDict, dict[str, Any]]:  # pragma: no cover - every size implements it
        """Fine-tune a fresh copy of the pretrained encoder on ``tasks``; ``(weights, log)``."""
        raise NotImplementedError

    def _run_key_parts(self, tasks: Sequence[str]) -> dict[str, Any]:
        """What else identifies a run of this size besides the benchmark, tasks, heads and recipe."""
        return {}

    def _imported_expert(self, task: str) -> StateDict | None:
        """An expert imported from elsewhere instead of trained (``None``: train it)."""
        return None

    def _imported_log(self, task: str) -> dict[str, Any] | None:
        return None

    def shipped_run(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> Artifact | None:
        """The run ``(kind, tasks, cfg)`` as mergelab ships it, to be taken instead of training, or
        ``None`` (train it). Only the tiny size ships runs (:mod:`mergelab.benchmarks.tiny.ship`)."""
        return None

    def _after_run(self, artifact: Artifact) -> None:
        """Clean up after a run is cached (e.g. a resume point)."""

    # ------------------------------------------------------------------ shared
    def expert_recipe(self, task: str, cfg: FinetuneConfig | None = None) -> FinetuneConfig:
        """The recipe an expert on ``task`` trains with (default :attr:`default_recipe`)."""
        return cfg or self.default_recipe

    def run_key(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig, parts: Mapping[str, Any] | None = None
                ) -> str:
        """Cache key (16 hex digits) of a fine-tuning run: ``kind`` (``"expert"`` or ``"multitask"``),
        its tasks, the benchmark, the tasks' head digests, every hyperparameter of ``cfg`` and the
        size's own parts (:meth:`_run_key_parts`, or ``parts`` when given)."""
        if not isinstance(cfg, FinetuneConfig):
            raise ValueError(f"cfg={cfg!r} is not valid; pass a FinetuneConfig, e.g. FinetuneConfig(**{cfg!r}) for a "
                             "mapping of its fields (valid fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(FinetuneConfig))}).")
        return config_hash({"benchmark": self.key, "kind": kind, "tasks": list(tasks),
                            "heads": [self.head_digest(t) for t in tasks], "finetune": recipe_fields(cfg),
                            **({"train_threads": self.train_threads} if self.train_threads is not None else {}),
                            **(self._run_key_parts(tasks) if parts is None else parts),
                            **codeversion.key_part("finetune")})

    def run_artifact(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> Artifact:
        """Where the run ``(kind, tasks, cfg)`` is cached."""
        return Artifact.at(self.experts_dir, kind, self.run_key(kind, tasks, cfg))

    def _train_cached(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> StateDict:
        artifact = self.run_artifact(kind, tasks, cfg)
        state = artifact.get_or_build(lambda: self._train_run(kind, tasks, cfg, artifact),
                                      metadata={"kind": kind, "tasks": ",".join(tasks)})
        self._after_run(artifact)
        return state

    def expert(self, task: str, cfg: FinetuneConfig | None = None) -> StateDict:
        """The encoder fine-tuned on ``task`` with ``cfg`` (:meth:`expert_recipe`; cached), or the
        imported expert where the size imports them."""
        task = self.check_task(task)
        imported = self._imported_expert(task)
        if imported is not None:
            return imported
        return self._train_cached("expert", [task], self.expert_recipe(task, cfg))

    def experts(self, cfg: FinetuneConfig | None = None, tasks: Iterable[str] | None = None
                ) -> dict[str, StateDict]:
        """One expert per task with the same recipe, with a progress bar over tasks."""
        tasks = self._task_list(tasks)
        return {t: self.expert(t, cfg) for t in tqdm(tasks, desc="experts", disable=not self.progress)}

    def expert_log(self, task: str, cfg: FinetuneConfig | None = None) -> dict[str, Any]:
        """The log (recipe, loss curve, wall time) of an expert, or where an imported one came from."""
        task = self.check_task(task)
        imported = self._imported_log(task)
        if imported is not None:
            return imported
        self.expert(task, cfg)
        return self.run_artifact("expert", [task], self.expert_recipe(task, cfg)).meta()

    def _task_list(self, tasks: Iterable[str] | None) -> list[str]:
        """A ``tasks`` argument as a list of checked names (``None`` or empty: every task of the benchmark); a single
        string is refused with a message, not read as its letters."""
        return [self.check_task(t) for t in (task_names(tasks, list(self.tasks)) or self.tasks)]

    def multitask(self, cfg: FinetuneConfig | None = None, tasks: Iterable[str] | None = None) -> StateDict:
        """One encoder fine-tuned on all ``tasks`` jointly (one batch loss per task each step)."""
        tasks = sorted(self._task_list(tasks))
        return self._train_cached("multitask", tasks, cfg or self.default_recipe)

    # ------------------------------------------------------------------ evaluation, cached per weights
    cache_dir: Path

    def check_split(self, split: str) -> str:  # pragma: no cover - every size implements it
        raise NotImplementedError

    def _eval_key(self, task: str, split: str) -> str:  # pragma: no cover - every size implements it
        """What decides one task's result on ``split`` besides the weights (head, data, arithmetic)."""
        raise NotImplementedError

    def evaluation_key(self, task: str, split: str) -> str:
        """:meth:`_eval_key` of a checked task and split: what decides one task's result on ``split`` besides
        the weights. Per-example responses (:class:`mergelab.analysis.responses.ResponseEvaluator`) key their
        cache on it too, so that other data or other arithmetic is never read from an earlier run's file. What
        it names of the data is each size's: at the clip size the split's fingerprint (task, split, size,
        labels, example indices and its files' sizes and modification times), not the images' bytes."""
        return self._eval_key(self.check_task(task), self.check_split(split))

    def eval_features(self, encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Features ``(n, d)`` float32 of ``images`` (a batch on :attr:`device`) in the arithmetic of this
        benchmark's evaluations (a size with mixed precision runs the encoder under its autocast)."""
        return encoder(images).float()

    def _eval_encoder_for(self, state: StateDict) -> torch.nn.Module:  # pragma: no cover
        """An encoder on :attr:`device` in eval mode holding ``state``."""
        raise NotImplementedError

    def _evaluate_task(self, encoder: torch.nn.Module, task: str, split: str
                       ) -> tuple[int, float, int]:  # pragma: no cover - every size implements it
        """``(correct, summed cross-entropy in nats, examples)`` of ``encoder`` on ``task``'s ``split``."""
        raise NotImplementedError

    def _eval_path(self, digest: str) -> Path:
        return self.cache_dir / "eval" / digest[:2] / f"{digest}.json"

    @torch.no_grad()
    def evaluations(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None
                    ) -> dict[str, dict[str, Any]]:
        """Per task ``{"task", "split", "accuracy" (0..1), "loss" (mean nats), "n"}`` of the encoder
        ``state`` with the task's own head.

        Cached on disk per weights: ``<cache_dir>/eval/<digest[:2]>/<digest>.json`` (the digest is
        :func:`mergelab.utils.state_digest`, the entry :meth:`_eval_key`: head, data, batch size, device
        type, precision), so the same weights evaluated again (a coefficient grid's 0, an expert in several
        chapters, a re-run) are not run again. A result is the one its first pass computed. Two processes
        that evaluate the same weights at once may each rewrite the file without the other's new entries
        (the rename is atomic, so the file is never corrupt): the lost entries are evaluated again.
        """
        split = self.check_split(split)
        tasks = self._task_list(tasks)
        digest = state_digest(state)
        path = self._eval_path(digest)
        cache: dict[str, Any] = read_json(path, {})  # missing or unreadable: evaluate again and rewrite it
        out: dict[str, dict[str, Any]] = {}
        encoder: torch.nn.Module | None = None
        for task in tasks:
            key = self._eval_key(task, split)
            if key not in cache:
                if encoder is None:
                    encoder = self._eval_encoder_for(state)
                correct, loss, n = self._evaluate_task(encoder, task, split)
                if n == 0:  # every size's one check: an accuracy of no examples is undefined
                    raise ValueError(f"task {task!r} split {split!r} has no examples in {type(self).__name__}'s "
                                     "data; check the task's data folder or the split's size.")
                cache[key] = {"task": task, "split": split, "accuracy": correct / n, "loss": loss / n, "n": n}
                atomic_write_json(path, cache)
            out[task] = cache[key]
        return out

    def evaluate(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None
                 ) -> dict[str, float]:
        """Top-1 accuracy (fraction 0..1) of the encoder ``state`` on each task with its own head (cached:
        :meth:`evaluations`)."""
        return {t: r["accuracy"] for t, r in self.evaluations(state, split, tasks).items()}

    def evaluate_loss(self, state: StateDict, split: str = "test", tasks: Iterable[str] | None = None
                      ) -> dict[str, float]:
        """Mean cross-entropy (nats) of the encoder ``state`` on each task with its own head (cached)."""
        return {t: r["loss"] for t, r in self.evaluations(state, split, tasks).items()}
