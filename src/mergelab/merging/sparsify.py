"""Sparsifiers shared by merge methods: magnitude trim with a global threshold, random drop with
rescaling, and sign consensus with a disjoint mean. TIES, DARE (and their cousins) compose these.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ..task_vectors import TaskVector


def ties_threshold(task_vector: TaskVector, density: float) -> float:
    """Magnitude above which a task vector's entries are kept so that a ``density`` share survives.

    The threshold is global over the whole task vector, as in TIES' official code: the k-th smallest
    ``|x|`` with ``k = round((1 - density) * n_params)``. It is found without concatenating the
    task vector (see :func:`kth_smallest_magnitude`), so memory stays at one layer.
    """
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise ValueError(f"density={density!r} is not valid; use a fraction in (0, 1] of entries to keep.")
    if density == 1:
        return -1.0
    n = sum(v.numel() for v in task_vector.vector.values())
    k = max(1, int(round((1 - density) * n)))
    return kth_smallest_magnitude(list(task_vector.vector.values()), k)


def kth_smallest_magnitude(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The exact ``k``-th smallest (1-based) ``|x|`` over all entries of ``tensors``, in float32.

    Streams the tensors twice (a radix select on the bits of float32 magnitudes, which order like
    the integers they spell): a 65,536-bin histogram of the top 16 bits finds the bucket holding the
    k-th value, a 32,768-bin histogram of the low 15 bits inside that bucket finds the value. Extra
    memory is a few copies of the largest tensor, never the concatenation; the result equals
    ``torch.cat([t.abs().flatten() for t in tensors]).kthvalue(k)``, in about the same time.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is not valid for {total} entries; use 1..{total}.")

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).abs().view(torch.int32)

    high = torch.zeros(1 << 16, dtype=torch.int64)
    for t in tensors:
        high += torch.bincount(bits(t) >> 15, minlength=1 << 16)
    cumulative = high.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    rank = k - (int(cumulative[bucket - 1]) if bucket > 0 else 0)
    low = torch.zeros(1 << 15, dtype=torch.int64)
    for t in tensors:
        b = bits(t)
        low += torch.bincount(b[(b >> 15) == bucket] & 0x7FFF, minlength=1 << 15)
    value = (bucket << 15) | int(torch.searchsorted(low.cumsum(0), rank))
    return float(torch.tensor([value], dtype=torch.int32).view(torch.float32))


def ties_merge_tensor(stacked: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES on one parameter: trim, elect sign, disjoint mean.

    Args:
        stacked: ``(T, *shape)`` updates of the T tasks for this parameter.
        thresholds: ``(T,)`` per-task magnitude thresholds (entries with ``|x| <= thr`` are trimmed).

    Returns:
        ``(*shape)``: for each entry, the mean over tasks whose trimmed value is non-zero and has the
        elected sign (the sign of the sum of trimmed values); zero where no task agrees.
    """
    thr = thresholds.reshape(-1, *([1] * (stacked.ndim - 1))).to(stacked)
    trimmed = torch.where(stacked.abs() > thr, stacked, torch.zeros_like(stacked))
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


TIES_CHUNK = 1 << 18
"""Entries of one parameter that :func:`mergelab.merging.ties.merge_ties` merges at a time (memory only: TIES works entry by
entry, so chunking does not change the result)."""


def ties_merge_chunked(tensors: Sequence[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
    """:func:`ties_merge_tensor` of ``T`` same-shaped tensors, ``TIES_CHUNK`` entries at a time, so the
    temporaries are ``T x TIES_CHUNK`` rather than ``T x numel`` (a few of them per call)."""
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(flats[0])
    for i in range(0, out.numel(), TIES_CHUNK):
        out[i:i + TIES_CHUNK] = ties_merge_tensor(torch.stack([f[i:i + TIES_CHUNK] for f in flats]), thresholds)
    return out.reshape(tensors[0].shape)


def _check_drop_rate(drop_rate: float) -> None:
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, numbers.Real) or not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate={drop_rate!r} is not valid; use a probability in [0, 1).")


def _drop(v: torch.Tensor, drop_rate: float, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(v.shape, generator=g) >= drop_rate
    return torch.where(keep.to(v.device), v / (1 - drop_rate), torch.zeros_like(v))


def drop_and_rescale(task_vector: TaskVector, drop_rate: float, seed: int = 0) -> TaskVector:
    """DARE's sparsifier (Yu et al., 2024): drop each entry with probability ``drop_rate``, rescale
    survivors by ``1 / (1 - drop_rate)``, so the task vector is preserved in expectation.

    The masks come from one generator seeded with ``seed``, drawn parameter by parameter in the task
    vector's key order (:class:`StreamedDrops` draws the same masks one parameter at a time)."""
    _check_drop_rate(drop_rate)
    g = torch.Generator().manual_seed(seed)
    return TaskVector({k: _drop(v, drop_rate, g) for k, v in task_vector.items()})


class StreamedDrops:
    """:func:`drop_and_rescale` of one task vector, one parameter at a time: ``drops[key]`` equals
    ``drop_and_rescale(task_vector, drop_rate, seed)[key]`` but holds no sparsified copy of the rest.

    Keys asked for in the task vector's order cost one draw each (the masks of keys skipped on the
    way are drawn and dropped, so the random stream stays the same); asking for an earlier key
    restarts the stream from ``seed``.
    """

    def __init__(self, task_vector: TaskVector, drop_rate: float, seed: int = 0) -> None:
        _check_drop_rate(drop_rate)
        self.task_vector, self.drop_rate, self.seed = task_vector, drop_rate, seed
        self.order = list(task_vector.keys())
        self._restart()

    def _restart(self) -> None:
        self._g = torch.Generator().manual_seed(self.seed)
        self._next = 0  # index in self.order of the next mask the generator will draw

    def __getitem__(self, key: str) -> torch.Tensor:
        at = self.order.index(key)
        if at < self._next:
            self._restart()
        while self._next < at:  # draw and drop the masks of the keys in between
            torch.rand(self.task_vector[self.order[self._next]].shape, generator=self._g)
            self._next += 1
        self._next += 1
        return _drop(self.task_vector[key], self.drop_rate, self._g)
