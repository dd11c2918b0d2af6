"""Chapter 01's curvature at one point: the Hessian's extreme eigenvalues of a task's loss at given encoder weights,
cached per point. The cache's code version (:mod:`mergelab.codeversion`, ``evaluation``) covers this module only,
not the recipe logic of :mod:`mergelab.experiments.ch01_curvature` that aggregates the points and writes no cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import codeversion
from ..autodiff import hessian_extremes
from ..cache import Artifact, read_result, result_path
from ..utils import StateDict, atomic_write_json, size_threads, state_digest

CURVATURE_FIELDS = ("lambda_max", "lambda_min", "residual_max", "residual_min")
"""The four numbers cached per point: the extreme eigenvalues and each one's Ritz residual."""


def weights_name(state: StateDict) -> str:
    """What names the weights ``state`` in a curvature point's cache key: their digest
    (:func:`~mergelab.utils.state_digest`, 24 hex digits)."""
    return state_digest(state)


def checkpoint_name(entry: Artifact) -> str | None:
    """What names a cached checkpoint's weights in a curvature point's cache key without loading them: the SHA-256
    of its file as its sidecar records it (``"file-sha256:<64 hex digits>"``; :meth:`Artifact.load` checks the file
    against it, so the weights a point is computed on are the ones named). ``None`` when the sidecar records none
    (an artifact written before checksums were kept): name the loaded weights by :func:`weights_name` then."""
    sha = entry.meta().get("sha256") if entry.sidecar.is_file() else None
    return f"file-sha256:{sha}" if isinstance(sha, str) and sha else None


def curvature_path(bench: Any, task: str, weights: str, batch_size: int, iters: int, seed: int) -> Path | None:
    """Where one point's eigenvalues are cached (:func:`~mergelab.cache.result_path`, folder ``curvature``): the key
    names the weights (``weights``: :func:`weights_name` or :func:`checkpoint_name`), the task's data, head and
    arithmetic (:meth:`evaluation_key`), the device, ``batch_size``, ``iters``, ``seed``, the fields kept and the
    evaluation code's version. ``None`` for a benchmark without a cache folder."""
    return result_path(bench, "curvature", lambda: {
        "state": weights, "task": bench.evaluation_key(task, "train"),
        "device": torch.device(bench.device).type, "batch_size": int(batch_size), "iters": int(iters),
        "seed": int(seed), "fields": list(CURVATURE_FIELDS), **codeversion.key_part("evaluation")})


def read_point(path: Path | None) -> dict[str, float] | None:
    """The four cached numbers at ``path`` (:func:`curvature_path`), or ``None`` when they are not cached."""
    cached = read_result(path, CURVATURE_FIELDS)
    return None if cached is None else {k: float(cached[k]) for k in CURVATURE_FIELDS}


def extreme_eigenvalues(bench: Any, task: str, state: StateDict, batch_size: int, iters: int, seed: int,
                        weights: str | None = None) -> dict[str, float]:
    """``lambda_max`` and ``lambda_min`` of the Hessian of ``task``'s mean cross-entropy (its head) on its first
    ``batch_size`` training examples at the encoder weights ``state``, with ``residual_max`` and ``residual_min``,
    each estimate's Ritz residual (:func:`mergelab.autodiff.hessian_extremes`: ``iters`` Lanczos steps, one
    Hessian-vector product each, from ``seed``).

    Cached as ``<cache_dir>/curvature/<key>.json`` (:func:`curvature_path`): a re-run reads the four numbers back
    instead of running the Lanczos steps again. ``weights`` names ``state`` in the key when the caller already holds
    a name for it (:func:`checkpoint_name` of the file it was loaded from); ``None``: its digest."""
    path = curvature_path(bench, task, weights if weights is not None else weights_name(state), batch_size, iters,
                          seed)
    cached = read_point(path)
    if cached is not None:
        return cached
    X, y = bench.split(task, "train")
    enc = bench.new_encoder(state).to(bench.device)
    # on the size's training threads whoever calls (a lane, a notebook): the key names no thread count
    with size_threads(bench):
        r = hessian_extremes(enc, bench.heads[task].to(bench.device), X[:batch_size].to(bench.device),
                             y[:batch_size].to(bench.device), iters, seed)
    out = {k: float(getattr(r, k)) for k in CURVATURE_FIELDS}
    if path is not None:
        atomic_write_json(path, {**out, "task": task, "batch_size": int(batch_size), "iters": int(iters),
                                 "seed": int(seed)})
    return out
