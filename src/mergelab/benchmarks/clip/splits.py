"""The clip size's split rules, the public benchmark's (mlfoundations/task_vectors and the official TSV code):
``val`` carved from the training split (:func:`train_val_split`), EuroSAT's stand-in split when its public split
folders are absent (:func:`eurosat_split`), and the seeded cap on a split's size (:func:`capped`). The rules
themselves are described in :mod:`mergelab.benchmarks.clip.datasets`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

VAL_FRACTION = 0.1
MAX_VAL_EXAMPLES = 5000
VAL_SEED = 0
HOLDOUT_SEED = 0
EUROSAT_HOLDOUT_FRACTION = 0.1
"""Share of each EuroSAT class held out as ``test``, and again as ``val``, by :func:`eurosat_split`
(21,600 / 2,700 / 2,700 images: the public split's sizes)."""

SPLIT_RULE_VERSION = 2
"""Bump when a split rule changes, so that cached experts and evaluations keyed by it are not reused."""


def train_val_split(n: int, val_fraction: float = VAL_FRACTION, max_val: int = MAX_VAL_EXAMPLES,
                    seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, val)`` in a training split of ``n`` examples, by the public benchmark's rule.

    ``n_val = min(floor(val_fraction * n), max_val)``; a permutation of ``range(n)`` drawn by
    ``torch.randperm`` with a generator seeded by ``seed`` gives ``train`` (its first ``n - n_val``
    entries) and ``val`` (the rest), which is what ``torch.utils.data.random_split`` does.
    """
    n_val = min(int(n * val_fraction), max_val)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[: n - n_val], perm[n - n_val:]


def eurosat_split(labels: Sequence[int], fraction: float = EUROSAT_HOLDOUT_FRACTION,
                  seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(train, val, test)`` of EuroSAT without the public split folders: a documented,
    deterministic stand-in for the public random split of the same sizes.

    ``labels`` are in the order of the sorted class folders and, within a class, sorted file names
    (torchvision's order). Per class of ``n_c`` images, a permutation of ``range(n_c)`` drawn by
    ``torch.randperm`` seeded by ``seed`` gives ``floor(fraction * n_c)`` test images (its first
    entries), as many val images (the next) and the rest train; each list is sorted. On the 27,000
    images this is 21,600 / 2,700 / 2,700, the public sizes (the public images themselves were drawn
    without a published seed).
    """
    labels = np.asarray(labels)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        k = int(len(where) * fraction)
        perm = torch.randperm(len(where), generator=torch.Generator().manual_seed(seed)).numpy()
        parts["test"].append(where[perm[:k]])
        parts["val"].append(where[perm[k:2 * k]])
        parts["train"].append(where[perm[2 * k:]])
    return tuple(np.sort(np.concatenate(parts[s])) if parts[s] else np.zeros(0, np.int64)
                 for s in ("train", "val", "test"))  # type: ignore[return-value]


def capped(indices: np.ndarray, limit: int | None, seed: int = 1) -> np.ndarray:
    """At most ``limit`` of ``indices``: a seeded random subset (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed)).numpy()[:limit]
    return indices[pick]
