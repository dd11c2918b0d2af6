"""The benchmark interface every size implements (``tiny``, ``clip``), declared in full.

A benchmark owns the tasks' data, the pretrained encoder, one frozen classification head per task,
the cached experts and the evaluation. Everything above it (training sweeps, trajectories, analyses,
chapters) talks to it through this protocol only, so a new size is one class that satisfies it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..training import FinetuneConfig
from ..utils import StateDict


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

    def run_key(self, kind: str, tasks: Sequence[str], cfg: FinetuneConfig) -> str:
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
