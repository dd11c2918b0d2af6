"""Models of one task trained from scratch from different initializations (the setting of model
alignment): scikit-learn's digits, an MLP, a small ResNet or open_clip's ViT, cached by configuration.

The digits (1,797 images of 8x8 pixels, 16 grey levels, 10 classes) ship with scikit-learn, so this
runs offline. The split is fixed by ``split_seed`` and stratified; models differ only in ``seed``
(initialization and data order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import codeversion, paths
from ..alignment.architectures import ARCHITECTURES, build_model, check_vit_settings, no_onednn
from ..alignment.specs import PermutationSpec
from ..cache import Artifact
from ..utils import check_integer, check_number, config_hash, keeps_global_rng, torch_threads

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class DigitsSplit:
    """Digits images ``(N, 1, 8, 8)`` in [0, 1] and labels ``(N,)``, per split."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int = 10


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits, split stratified into train and test by ``split_seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} is not valid; use a number in (0, 1).")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=test_fraction, random_state=split_seed,
                                          stratify=d.target)
    t = torch.from_numpy
    return DigitsSplit(t(Xtr), t(ytr).long(), t(Xte), t(yte).long())


@dataclass(frozen=True)
class ScratchConfig:
    """One model trained from scratch.

    Attributes:
        arch: ``"mlp"``, ``"resnet"`` or ``"vit"`` (:data:`~mergelab.alignment.architectures.ARCHITECTURES`).
        widths: hidden widths (MLP), channels per stage (ResNet) or ``[width]`` (ViT: the residual stream).
        blocks: basic blocks per stage (ResNet) or residual attention blocks (ViT).
        heads, patch_size: attention heads per block and patch side in pixels: required for the ViT,
            ``None`` (left out) for the others, and then absent from the cache key, so the MLP's and
            ResNet's keys are those of the code before the ViT.
        epochs, batch_size, lr, weight_decay: the recipe; the learning rate follows a cosine schedule
            after ``warmup_epochs`` of linear warm-up.
        optimizer: ``"adam"`` (Adam) or ``"sgd"`` (SGD with momentum ``momentum``).
        seed: initialization and data order: the only thing that differs between models of a set.
    """

    arch: str = "mlp"
    widths: tuple[int, ...] = (128, 128, 128)
    blocks: int = 1
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0
    heads: int | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is not valid; use one of {', '.join(ARCHITECTURES)}.")
        if isinstance(self.widths, (str, bytes)) or not hasattr(self.widths, "__iter__") or not len(self.widths):
            raise ValueError(f"widths={self.widths!r} is not valid; use a non-empty list of positive integers.")
        for width in self.widths:
            check_integer("widths", width)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        for name in ("lr", "weight_decay", "momentum"):  # 0 and 0.0 from a YAML file hash alike
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not valid; use one of {', '.join(OPTIMIZERS)}.")
        for name in ("epochs", "batch_size", "blocks"):
            check_integer(name, getattr(self, name))
        check_integer("warmup_epochs", self.warmup_epochs, minimum=0)
        if self.warmup_epochs > self.epochs:  # the learning rate would never reach its peak
            raise ValueError(f"warmup_epochs={self.warmup_epochs!r} is not valid; use 0..epochs={self.epochs}.")
        check_integer("seed", self.seed, minimum=0)
        check_vit_settings(self.arch, self.widths, self.heads, self.patch_size)

    def key(self) -> dict[str, Any]:
        """The configuration as the cache key names it: every field, less the ViT's settings when unset."""
        return {k: v for k, v in asdict(self).items() if not (k in ("heads", "patch_size") and v is None)}


@keeps_global_rng
def new_model(cfg: ScratchConfig, data: DigitsSplit) -> tuple[nn.Module, PermutationSpec]:
    """A freshly initialized model of ``cfg`` for ``data`` (initialized from ``cfg.seed``) and its spec."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.arch, tuple(data.X_train.shape[1:]), data.num_classes, cfg.widths, cfg.blocks,
                       cfg.heads, cfg.patch_size)


SCRATCH_THREADS = 1
"""Torch threads a model trains on, whoever trains it: a worker process of chapter 06 has one, and a model trained
in the chapter's own process (``workers: 1``) must have the same bits (its cache key names no thread count)."""


def train_from_scratch(cfg: ScratchConfig, data: DigitsSplit, progress: bool = False,
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """Train a model of ``cfg`` on ``data``'s training split, on :data:`SCRATCH_THREADS` torch threads; return its
    state dict and a log (final training loss, seconds)."""
    with torch_threads(SCRATCH_THREADS):
        return _train_from_scratch(cfg, data, progress)


def _train_from_scratch(cfg: ScratchConfig, data: DigitsSplit, progress: bool) -> tuple[dict[str, torch.Tensor], dict]:
    model, _ = new_model(cfg, data)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(data.X_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, step, last = time.perf_counter(), 0, float("nan")
    model.train()
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.arch} seed {cfg.seed}", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, cfg.batch_size):
            lr = cfg.lr * ((step + 1) / warm if step < warm else
                           0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i:i + cfg.batch_size]
            with no_onednn():
                loss = F.cross_entropy(model(data.X_train[idx]), data.y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            step, last = step + 1, float(loss.detach())
        bar.set_postfix(loss=f"{last:.3f}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {"final_batch_loss": last, "seconds": time.perf_counter() - start, "steps": step}


def scratch_artifact(cfg: ScratchConfig, data_key: Mapping[str, Any]) -> Artifact:
    """Where :func:`cached_from_scratch` keeps the model of ``cfg`` trained on the data ``data_key`` names:
    ``<data>/scratch/<arch>-<hash>.safetensors``."""
    key = config_hash({"config": cfg.key(), "data": dict(data_key), **codeversion.key_part("scratch")})
    return Artifact.at(paths.data_dir() / "scratch", cfg.arch, key)


def cached_from_scratch(cfg: ScratchConfig, data: DigitsSplit, data_key: dict, progress: bool = False,
                        shipped: Callable[[str], tuple[dict[str, torch.Tensor], dict[str, Any]] | None] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """:func:`train_from_scratch`, cached in ``<data>/scratch/<arch>-<hash>.safetensors`` by the
    configuration and ``data_key`` (what made ``data``). Where ``shipped``, given the artifact's name
    (``<arch>-<hash>``), returns ``(state, log)``, the cache takes that instead of training: the models mergelab
    ships (:func:`mergelab.experiments.ch06_models.shipped_model`)."""
    artifact = scratch_artifact(cfg, data_key)

    def build() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        copy = shipped(artifact.path.stem) if shipped is not None else None
        if copy is not None:
            return copy
        state, log = train_from_scratch(cfg, data, progress)
        return state, {"config": cfg.key(), "data": data_key, **log}

    return artifact.get_or_build(build)


@torch.no_grad()
def evaluate_state(model: nn.Module, state: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 1024, return_correct: bool = False) -> dict:
    """``{"accuracy": fraction correct, "loss": mean cross-entropy in nats}`` of ``model`` with
    ``state`` loaded, on ``(X, y)``; with ``return_correct``, also ``"correct"``: a bool tensor ``(N,)``."""
    model.load_state_dict(state)
    model.eval()
    hits, loss = [], 0.0
    for i in range(0, len(X), batch_size):
        logits = model(X[i:i + batch_size])
        loss += float(F.cross_entropy(logits.double(), y[i:i + batch_size], reduction="sum"))
        hits.append(logits.argmax(1) == y[i:i + batch_size])
    correct = torch.cat(hits)
    out = {"accuracy": float(correct.float().mean()), "loss": loss / len(X)}
    return {**out, "correct": correct} if return_correct else out
