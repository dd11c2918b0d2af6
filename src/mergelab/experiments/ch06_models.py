"""Chapter 06's models: scikit-learn's digits split and, per architecture, models of one task trained
from scratch from seeds ``seed, seed + 1, ...`` (cached by configuration), the ones not cached yet
trained as independent jobs of an executor (:mod:`mergelab.executors`). The tiny size's models ship with
mergelab (:func:`shipped_model`), as chapter 00's experts do: a fresh cache takes them instead of training.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..alignment import PermutationSpec
from ..benchmarks.tiny import ship
from ..cache import Artifact
from ..executors import Executor, LocalExecutor, WorkerContext
from ..training.scratch import (
    DigitsSplit,
    ScratchConfig,
    cached_from_scratch,
    load_digits_split,
    new_model,
    scratch_artifact,
)
from ..utils import check_integer, check_number, config_hash

StateAndLog = tuple[dict[str, torch.Tensor], dict[str, Any]]


def shipped_model(name: str) -> StateAndLog | None:
    """``(state, log)`` of the model mergelab ships under the cache name ``name`` (``<arch>-<key>``,
    :func:`~mergelab.benchmarks.tiny.ship.shipped_scratch`), its log marked ``"shipped": True``; ``None`` when none
    ships or ``MERGELAB_FINETUNE=1`` asks to train here."""
    artifact = ship.shipped_scratch(name)
    return ship.taken(artifact) if artifact is not None else None


def _check_training_requested_in_a_shipped_cache(artifact: Artifact) -> None:
    """Refuse ``MERGELAB_FINETUNE=1`` where the cache already holds a shipped copy of ``artifact``'s model."""
    if ship.requested(ship.ENV_FINETUNE) and artifact.exists() and artifact.meta().get("shipped"):
        raise ValueError(f"{ship.ENV_FINETUNE}=1 asks to train chapter 06's models here, but {artifact.path} is the "
                         "shipped copy: remove the caches (`make clean-cache`, or point MERGELAB_DATA_DIR at an "
                         "empty folder), then run again.")


def digits_data(digits: Mapping[str, Any]) -> tuple[DigitsSplit, dict[str, Any]]:
    """The digits split of the ``digits`` parameter (``test_fraction``, ``split_seed``) and the key
    that identifies it in the cache."""
    valid = ("test_fraction", "split_seed")
    if not isinstance(digits, Mapping) or set(digits) != set(valid):
        names = sorted(map(str, digits)) if isinstance(digits, Mapping) else None
        raise ValueError(f"digits={dict(digits) if names is not None else digits!r} is not valid; give exactly "
                         f"{', '.join(valid)} (it names {names}), e.g. {{test_fraction: 0.25, split_seed: 0}}.")
    check_number("digits test_fraction", digits["test_fraction"], 0, 1, low_open=True, high_open=True)
    check_integer("digits split_seed", digits["split_seed"], minimum=0)
    key = {"dataset": "sklearn-digits", "test_fraction": float(digits["test_fraction"]),
           "split_seed": int(digits["split_seed"])}
    return _split(key["test_fraction"], key["split_seed"]), key


@functools.lru_cache(maxsize=4)
def _split(test_fraction: float, split_seed: int) -> DigitsSplit:
    """:func:`load_digits_split`, loaded once per process (the notebook, the training and the merge
    jobs all ask for it; nothing writes to its tensors)."""
    return load_digits_split(test_fraction, split_seed)


def _check_num_models(num_models: int) -> None:
    if isinstance(num_models, bool) or not isinstance(num_models, numbers.Integral) or num_models < 2:
        raise ValueError(f"num_models={num_models!r} is not valid; merging needs at least 2 models.")


@dataclass
class Trained:
    """Models of one architecture from different seeds: a module to evaluate states with, the spec,
    the state dicts and the recipe (``cfg.seed`` is the first model's seed)."""

    arch: str
    model: nn.Module
    spec: PermutationSpec
    states: list[dict[str, torch.Tensor]]
    cfg: ScratchConfig


def digits_context(digits: Mapping[str, Any]) -> WorkerContext:
    """What every job of this chapter gets (built once per worker process): :func:`digits_data` of
    ``digits``, keyed by it, so training and merging jobs share one pool of workers."""
    split_and_key = digits_data(digits)
    key = "ch06-" + config_hash({"digits": split_and_key[1]})
    return WorkerContext(functools.partial(digits_data, dict(digits)), key=key, local=split_and_key)


def _train_job(context: tuple[DigitsSplit, dict[str, Any]], item: tuple[str, dict[str, Any], int]) -> str:
    """Train one model of :func:`train_models` into the cache (nothing if it is there); returns which one."""
    data, data_key = context
    arch, recipe, seed = item
    cached_from_scratch(ScratchConfig(arch=arch, **recipe, seed=seed), data, dict(data_key))
    return f"{arch} seed {seed}"


def train_models(arch: str, recipe: Mapping[str, Any], num_models: int, seed: int, data: DigitsSplit,
                 data_key: Mapping[str, Any], progress: bool = False) -> Trained:
    """``num_models`` models of ``arch`` trained from seeds ``seed .. seed + num_models - 1`` (cached)."""
    _check_num_models(num_models)
    return _trained(ScratchConfig(arch=arch, **recipe, seed=seed), num_models, data, data_key, progress)


def _trained(cfg: ScratchConfig, num_models: int, data: DigitsSplit, data_key: Mapping[str, Any],
             progress: bool = False) -> Trained:
    states = [cached_from_scratch(replace(cfg, seed=cfg.seed + i), data, dict(data_key), progress, shipped_model)
              for i in range(num_models)]
    model, spec = new_model(cfg, data)
    spec.validate(states[0])
    return Trained(cfg.arch, model, spec, states, cfg)


def train_all(architectures: Mapping[str, Mapping[str, Any]], num_models: int, seed: int,
              digits: Mapping[str, Any], executor: Executor | None = None, progress: bool = False,
              ) -> dict[str, Trained]:
    """:func:`train_models` of every architecture; the models not cached yet are trained first by
    ``executor`` (one job per model, the slowest architecture's first; default: here, one after the other)."""
    _check_num_models(num_models)
    data, data_key = digits_data(digits)
    executor = executor if executor is not None else LocalExecutor(1)
    for arch, recipe in architectures.items():  # every recipe builds its model here, before any job starts
        new_model(ScratchConfig(arch=arch, **recipe, seed=seed), data)  # (e.g. a ViT patch not dividing the images)
    slowest_first = {"resnet": 0, "vit": 1}  # the others after these (a worker free at the end takes a short job)
    jobs = []
    for arch, recipe in sorted(architectures.items(), key=lambda kv: slowest_first.get(kv[0], 2)):
        for i in range(num_models):
            artifact = scratch_artifact(ScratchConfig(arch=arch, **recipe, seed=seed + i), data_key)
            _check_training_requested_in_a_shipped_cache(artifact)
            if not artifact.exists() and ship.shipped_scratch(artifact.path.stem) is None:  # shipped: taken below
                jobs.append((arch, dict(recipe), seed + i))
    if jobs and not executor.inline:
        executor.map(_train_job, jobs, digits_context(digits), progress=progress,
                     describe=lambda j: {"architecture": j[0], "seed": j[2]}, desc="training").raise_failures("training runs")
    return {arch: train_models(arch, recipe, num_models, seed, data, data_key, progress)
            for arch, recipe in architectures.items()}
