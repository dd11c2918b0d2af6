"""Merge methods as plain functions registered by name, and validation-based coefficient choice.

A merge method maps ``(pretrained state dict, task vectors, options) -> merged state dict``. Methods
work one parameter tensor at a time (so peak memory stays near one model plus one layer of every
task) and run on whatever device the tensors are on.

Registered here: ``weight_averaging``, ``task_arithmetic``, ``ties``, ``dare`` (DARE on task
arithmetic). Other modules register more (e.g. TSV-M) with :func:`register_merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .task_vectors import TaskVector, check_compatible
from .utils import StateDict

MergeFn = Callable[..., StateDict]
LayerUpdate = tuple[list[str], Callable[[str], torch.Tensor]]
"""``(keys, U_k)``: the parameters a linear merge changes, and its update ``U`` for one of them."""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry key, in the field's words (``"task_arithmetic"``).
        fn: ``fn(pretrained, task_vectors, **options) -> merged state dict``.
        coefficient_grid: values of ``coefficient`` swept on validation; empty when the method has
            no coefficient to choose (e.g. weight averaging).
        defaults: default options.
        update: for methods of the form ``theta_0 + coefficient * U``:
            ``update(pretrained, task_vectors, **options) -> (keys, U_k)``, the parameters it changes
            and a function computing ``U`` for one of them; :func:`merge_with_validation` then
            computes ``U`` once for the whole coefficient sweep. ``None`` for other methods.
    """

    name: str
    fn: MergeFn
    coefficient_grid: tuple[float, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    update: Callable[..., LayerUpdate] | None = None

    def __call__(self, pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                 **options: Any) -> StateDict:
        return self.fn(pretrained, task_vectors, **{**self.defaults, **options})


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge(name: str, coefficient_grid: Sequence[float] = (),
                   update: Callable[..., LayerUpdate] | None = None, **defaults: Any
                   ) -> Callable[[MergeFn], MergeFn]:
    """Decorator registering ``fn`` under ``name`` in :data:`MERGE_METHODS` (``update``: see
    :class:`MergeMethod`)."""

    def wrap(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = MergeMethod(name, fn, tuple(float(c) for c in coefficient_grid), dict(defaults),
                                          update)
        return fn

    return wrap


def get_merge(name: str) -> MergeMethod:
    """The registered method ``name``, or an error listing the valid names."""
    if name not in MERGE_METHODS:
        raise ValueError(f"merge method {name!r} is not registered; valid: {', '.join(sorted(MERGE_METHODS))}.")
    return MERGE_METHODS[name]


def merge(name: str, pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
          **options: Any) -> StateDict:
    """Run the registered merge method ``name``."""
    return get_merge(name)(pretrained, task_vectors, **options)


def _validate(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]) -> list[str]:
    """Check every task vector against the pretrained model; return the keys to merge."""
    if len(task_vectors) == 0:
        raise ValueError("task_vectors is empty; pass at least one TaskVector to merge.")
    keys = list(task_vectors[0].keys())
    float_pre = {k: v for k, v in pretrained.items() if k in task_vectors[0].vector}
    if set(keys) - set(pretrained):
        extra = sorted(set(keys) - set(pretrained))[0]
        raise ValueError(f"task vector 0 has key {extra!r} that the pretrained state dict lacks: "
                         "the models do not share an architecture.")
    for i, tv in enumerate(task_vectors):
        check_compatible(float_pre, tv.vector, f"task vector {i}")
    return keys


def _assemble(pretrained: Mapping[str, torch.Tensor], keys: Iterable[str],
              update: Callable[[str], torch.Tensor]) -> StateDict:
    """``pretrained + update(k)`` for every ``k`` in ``keys`` (in float32, cast back to the
    parameter's dtype), a copy of ``pretrained[k]`` elsewhere. ``update`` is called one key at a time
    and its result dropped once added, so besides its inputs a merge holds the merged model and one
    layer's update (streaming), never a second full model of updates."""
    keys = set(keys)
    out: StateDict = {}
    for k, v in pretrained.items():
        out[k] = (v.float() + update(k).to(v.device)).to(v.dtype) if k in keys else v.clone()
    return out


# ----------------------------------------------------------------------------- baselines
@register_merge("weight_averaging")
def merge_weight_averaging(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]
                           ) -> StateDict:
    """Mean of the fine-tuned models: ``theta_0 + (1/T) sum_t tau_t`` (model soup, uniform)."""
    keys = _validate(pretrained, task_vectors)
    n = len(task_vectors)
    return _assemble(pretrained, keys, lambda k: sum(tv[k] for tv in task_vectors) / n)


def _scaled(pretrained: Mapping[str, torch.Tensor], update: LayerUpdate, coefficient: float) -> StateDict:
    """``theta_0 + coefficient * U``, one parameter at a time."""
    keys, layer = update
    return _assemble(pretrained, keys, lambda k: coefficient * layer(k))


def task_arithmetic_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector]
                           ) -> LayerUpdate:
    """Task arithmetic's update ``sum_t tau_t``, per parameter."""
    keys = _validate(pretrained, task_vectors)
    return keys, lambda k: sum(tv[k] for tv in task_vectors)


@register_merge("task_arithmetic", coefficient_grid=np.round(np.arange(0.05, 1.001, 0.05), 2),
                update=task_arithmetic_update, coefficient=0.3)
def merge_task_arithmetic(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                          coefficient: float = 0.3) -> StateDict:
    """Task arithmetic: ``theta_0 + coefficient * sum_t tau_t`` (Ilharco et al., 2023)."""
    return _scaled(pretrained, task_arithmetic_update(pretrained, task_vectors), coefficient)


def ties_threshold(task_vector: TaskVector, density: float) -> float:
    """Magnitude above which a task vector's entries are kept so that a ``density`` share survives.

    The threshold is global over the whole task vector, as in TIES' official code: the k-th smallest
    ``|x|`` with ``k = round((1 - density) * n_params)``. It is found without concatenating the
    task vector (see :func:`kth_smallest_magnitude`), so memory stays at one layer.
    """
    if not 0 < density <= 1:
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


def ties_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                density: float = 0.2) -> LayerUpdate:
    """TIES' update (trim to ``density``, elect signs, disjoint mean), per parameter."""
    keys = _validate(pretrained, task_vectors)
    thresholds = torch.tensor([ties_threshold(tv, density) for tv in task_vectors])
    return keys, lambda k: _ties_merge_chunked([tv[k] for tv in task_vectors], thresholds)


@register_merge("ties", coefficient_grid=np.round(np.arange(0.3, 2.01, 0.1), 2), update=ties_update,
                coefficient=1.0, density=0.2)
def merge_ties(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
               coefficient: float = 1.0, density: float = 0.2) -> StateDict:
    """TIES-Merging (Yadav et al., 2023): keep the top ``density`` share of each task vector by
    magnitude, elect a sign per entry by total mass, average the agreeing entries, scale by
    ``coefficient``."""
    return _scaled(pretrained, ties_update(pretrained, task_vectors, density), coefficient)


TIES_CHUNK = 1 << 18
"""Entries of one parameter that :func:`merge_ties` merges at a time (memory only: TIES works entry by
entry, so chunking does not change the result)."""


def _ties_merge_chunked(tensors: Sequence[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
    """:func:`ties_merge_tensor` of ``T`` same-shaped tensors, ``TIES_CHUNK`` entries at a time, so the
    temporaries are ``T x TIES_CHUNK`` rather than ``T x numel`` (a few of them per call)."""
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty_like(flats[0])
    for i in range(0, out.numel(), TIES_CHUNK):
        out[i:i + TIES_CHUNK] = ties_merge_tensor(torch.stack([f[i:i + TIES_CHUNK] for f in flats]), thresholds)
    return out.reshape(tensors[0].shape)


def dare(task_vector: TaskVector, drop_rate: float, seed: int = 0) -> TaskVector:
    """DARE (Yu et al., 2024): drop each entry with probability ``drop_rate``, rescale survivors by
    ``1 / (1 - drop_rate)``, so the task vector is preserved in expectation."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate={drop_rate!r} is not valid; use a probability in [0, 1).")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in task_vector.items():
        keep = torch.rand(v.shape, generator=g) >= drop_rate
        out[k] = torch.where(keep.to(v.device), v / (1 - drop_rate), torch.zeros_like(v))
    return TaskVector(out)


def dare_update(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
                drop_rate: float = 0.5, seed: int = 0) -> LayerUpdate:
    """DARE's update: the sum of the task vectors sparsified by :func:`dare` (seed ``seed + t``)."""
    _validate(pretrained, task_vectors)
    sparse = [dare(tv, drop_rate, seed + i) for i, tv in enumerate(task_vectors)]
    return task_arithmetic_update(pretrained, sparse)


@register_merge("dare", coefficient_grid=np.round(np.arange(0.05, 1.001, 0.05), 2), update=dare_update,
                coefficient=0.3, drop_rate=0.5, seed=0)
def merge_dare(pretrained: Mapping[str, torch.Tensor], task_vectors: Sequence[TaskVector],
               coefficient: float = 0.3, drop_rate: float = 0.5, seed: int = 0) -> StateDict:
    """DARE then task arithmetic: each task vector sparsified by :func:`dare` (seed ``seed + t``)."""
    return _scaled(pretrained, dare_update(pretrained, task_vectors, drop_rate, seed), coefficient)


# ----------------------------------------------------------------------------- coefficient choice
@dataclass
class MergeResult:
    """A merge with its coefficient chosen on validation.

    Attributes:
        method: registry name.
        coefficient: chosen value (``None`` for methods without one).
        state: the merged state dict at that coefficient.
        sweep: ``{coefficient: validation score}`` for every value tried.
        also: merged states at the other coefficients asked for (``also_at`` of
            :func:`merge_with_validation`), e.g. a method's data-free default.
    """

    method: str
    coefficient: float | None
    state: StateDict
    sweep: dict[float, float]
    also: dict[float, StateDict] = field(default_factory=dict)


def merge_with_validation(name: str, pretrained: Mapping[str, torch.Tensor],
                          task_vectors: Sequence[TaskVector], score: Callable[[StateDict], float],
                          grid: Sequence[float] | None = None, progress: bool = True,
                          also_at: Sequence[float] = (), **options: Any) -> MergeResult:
    """Merge with ``name``, choosing ``coefficient`` to maximize ``score`` (a validation metric).

    ``score`` must evaluate on validation data, never test. Ties go to the smaller coefficient.
    ``also_at``: coefficients whose merged states are kept as well (:attr:`MergeResult.also`), taken
    from the sweep when they are in ``grid`` and otherwise built from the same update, so that, say,
    TSV-M at ``alpha = 1`` does not compute its SVDs a second time.
    """
    method = get_merge(name)
    grid = tuple(method.coefficient_grid if grid is None else grid)
    if not grid:
        if also_at:
            raise ValueError(f"also_at={list(also_at)!r} needs a coefficient sweep; {name!r} got grid=().")
        state = method(pretrained, task_vectors, **options)
        return MergeResult(name, None, state, {})
    if method.update is not None:  # theta_0 + c * U: compute U once for the whole sweep
        settings = {k: v for k, v in {**method.defaults, **options}.items() if k != "coefficient"}
        keys, layer = method.update(pretrained, task_vectors, **settings)
        update = {k: layer(k) for k in keys}
        build = lambda c: _scaled(pretrained, (list(update), update.__getitem__), c)  # noqa: E731
    else:
        build = lambda c: method(pretrained, task_vectors, **{**options, "coefficient": c})  # noqa: E731
    wanted = {float(c) for c in also_at}
    sweep: dict[float, float] = {}
    also: dict[float, StateDict] = {}
    best: tuple[float, float, StateDict] | None = None
    for c in tqdm(grid, desc=f"{name}: coefficient on validation", disable=not progress, leave=False):
        state = build(float(c))
        s = float(score(state))
        sweep[float(c)] = s
        if float(c) in wanted:
            also[float(c)] = state
        if best is None or s > best[0]:
            best = (s, float(c), state)
    assert best is not None
    also.update({c: build(c) for c in wanted - set(also)})
    return MergeResult(name, best[1], best[2], sweep, also)


# ----------------------------------------------------------------------------- metrics
def absolute_accuracy(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks of top-1 accuracy (fractions 0..1)."""
    if not per_task:
        raise ValueError("per_task accuracies are empty.")
    return float(np.mean(list(per_task.values())))


def normalized_accuracy(per_task: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> float:
    """Mean over tasks of ``merged accuracy on t / expert t's accuracy on t`` (a mean of ratios)."""
    missing = [t for t in per_task if t not in expert_accuracy]
    if missing:
        raise ValueError(f"no expert accuracy for task {missing[0]!r}; have: {', '.join(expert_accuracy)}.")
    return float(np.mean([per_task[t] / expert_accuracy[t] for t in per_task]))
