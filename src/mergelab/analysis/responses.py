"""Per-image correctness of models on a benchmark split: the response matrices Item Response Theory
is fitted on, and the cheap fitness of evolutionary merging (only the subset's images are run).

Items are the images of ``tasks`` on ``split``, concatenated in task order (item ``i`` is image
``i - offset[t]`` of task ``t``). Full response vectors are cached per (benchmark, heads, split, tasks,
weights), keyed by a SHA-256 of the weights, under ``<data>/responses/`` (atomic writes); subsets are
not cached (they are the cheap case). Every image run through the encoder is counted in
:attr:`ResponseEvaluator.forward_passes` (cache hits cost none).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import codeversion, paths
from ..models import load_encoder_state
from ..utils import StateDict, atomic_save_npz, check_integer, config_hash, read_npz, state_digest, task_names


class ResponseEvaluator:
    """0/1 correctness of encoder states on the items of ``tasks`` x ``split``.

    Args:
        bench: a :class:`mergelab.benchmarks.Benchmark`.
        tasks: the tasks whose images are the items (default all).
        split: ``"val"`` for fitness (the test split stays for the final report).
        cache: cache full response vectors on disk.
        batch_size: images per forward pass batch (default: the benchmark's evaluation batch).
    """

    def __init__(self, bench: Any, tasks: Sequence[str] | None = None, split: str = "val", cache: bool = True,
                 batch_size: int | None = None) -> None:
        if batch_size is not None:
            check_integer("batch_size", batch_size)
        batch_size = batch_size or getattr(bench, "eval_batch_size", 256)
        self.bench, self.split, self.cache, self.batch_size = bench, split, cache, int(batch_size)
        self.tasks = list(task_names(tasks, list(bench.tasks)) or bench.tasks)
        self.labels = {t: bench.split(t, split)[1] for t in self.tasks}
        sizes = [len(self.labels[t]) for t in self.tasks]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_items = int(self.offsets[-1])
        self.item_task = np.repeat(np.arange(len(self.tasks)), sizes)
        self.forward_passes = 0
        self._encoder: torch.nn.Module | None = None
        # each task's evaluation key names its head, data and arithmetic (at the clip size the benchmark's own
        # key is the model alone: a subset of another size or other labels must not read these files); the batch
        # size is this evaluator's own (a batch's composition can move float rounding)
        self._key = config_hash({"benchmark": bench.key, "split": split, "tasks": self.tasks,
                                 "evaluation": [bench.evaluation_key(t, split) for t in self.tasks],
                                 "batch_size": self.batch_size, **codeversion.key_part("evaluation")})

    @property
    def key(self) -> str:
        """What decides these responses besides the weights (benchmark, split, tasks, each task's evaluation
        key): part of the cache key of anything computed from them, e.g. a search's checkpoint."""
        return self._key

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments but the benchmark: ``ResponseEvaluator(bench, **ev.settings())``
        is an equal evaluator (how workers rebuild one next to their copy of the benchmark)."""
        return {"tasks": list(self.tasks), "split": self.split, "cache": self.cache, "batch_size": self.batch_size}

    def _cache_path(self, state: StateDict) -> Path:
        return paths.data_dir() / "responses" / f"responses-{self._key}-{state_digest(state)}.npz"

    @torch.no_grad()
    def _run(self, state: StateDict, items: np.ndarray) -> np.ndarray:
        if self._encoder is None:
            self._encoder = self.bench.new_encoder()
        enc = load_encoder_state(self._encoder, state).to(self.bench.device).eval()
        out = np.zeros(items.size, dtype=bool)
        for j, task in enumerate(self.tasks):
            where = np.flatnonzero(self.item_task[items] == j)
            if where.size == 0:
                continue
            local = items[where] - self.offsets[j]
            head = self.bench.heads[task].to(self.bench.device)
            for s in range(0, local.size, self.batch_size):
                idx = local[s:s + self.batch_size]
                X = self.bench.images(task, self.split, idx).to(self.bench.device)
                pred = head(self.bench.eval_features(enc, X)).argmax(-1).cpu()
                out[where[s:s + self.batch_size]] = (pred == self.labels[task][idx]).numpy()
                self.forward_passes += idx.size
        return out

    def full(self, state: StateDict, reuse: bool = True) -> np.ndarray:
        """Correctness ``(N,)`` bool on every item (cached). ``reuse=False`` computes it and leaves the cache alone
        (no weight digest, no file read or written): what a search that is timed against another one does, so that
        its wall time is the time of its forward passes."""
        path = self._cache_path(state) if self.cache and reuse else None
        cached = read_npz(path) if path is not None else None  # missing or damaged: computed again
        if cached is not None and "bits" in cached:
            return np.unpackbits(cached["bits"], count=self.num_items).astype(bool)
        out = self._run(state, np.arange(self.num_items))
        if path is not None:
            atomic_save_npz(path, bits=np.packbits(out))
        return out

    def subset(self, state: StateDict, items: Sequence[int] | np.ndarray) -> np.ndarray:
        """Correctness ``(n,)`` bool on ``items`` only: ``n`` forward passes (not cached)."""
        idx = np.asarray(items, dtype=np.int64).reshape(-1)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= self.num_items:
            raise ValueError(f"items must be a non-empty set of indices in 0..{self.num_items - 1}.")
        return self._run(state, idx)

    def per_task_accuracy(self, responses: np.ndarray) -> dict[str, float]:
        """Accuracy per task (fractions 0..1) from a full response vector ``(N,)``."""
        r = np.asarray(responses, dtype=float)
        return {t: float(r[self.offsets[j]:self.offsets[j + 1]].mean()) for j, t in enumerate(self.tasks)}
