"""Chapter 01's curvature at one point: the Hessian's extreme eigenvalues of a task's loss at given encoder weights,
cached per point, and the names its cache keys give weights. The ``evaluation`` code version
(:mod:`mergelab.codeversion`) covers this module, which computes the cached numbers, not
:mod:`mergelab.experiments.ch01_curvature`, which plans the points and aggregates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import codeversion
from ..autodiff import hessian_extremes
from ..cache import Artifact, file_sha256, read_result, result_path
from ..utils import StateDict, atomic_write_json, size_threads, state_digest

CURVATURE_FIELDS = ("lambda_max", "lambda_min", "residual_max", "residual_min")
"""The four numbers cached per point: the extreme eigenvalues and each one's Ritz residual."""


def weights_name(state: StateDict) -> str:
    """What names the weights ``state`` in a curvature point's cache key: their digest
    (:func:`~mergelab.utils.state_digest`, 24 hex digits)."""
    return state_digest(state)


def file_name(sha256: str) -> str:
    """What names weights read from a file in a curvature point's cache key: ``"file-sha256:<its SHA-256>"``."""
    return f"file-sha256:{sha256}"


def checkpoint_name(entry: Artifact) -> str:
    """What names a cached checkpoint's weights in a curvature point's cache key, without parsing them: the
    :func:`file_name` of the SHA-256 its sidecar records (:meth:`Artifact.save` writes it), or of the file's bytes
    when the sidecar records none (an artifact written before checksums were kept). A job that computes the point
    names it by the bytes it loads (:meth:`Artifact.load_with_sha256`, checked against the sidecar's record), so a
    file that no longer matches its record fails there instead of being computed under the record's name."""
    sha = entry.meta().get("sha256") if entry.sidecar.is_file() else None
    return file_name(sha if isinstance(sha, str) and sha else file_sha256(entry.path))


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
    a name for it (:func:`file_name` of the bytes it was read from); ``None``: its digest."""
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
