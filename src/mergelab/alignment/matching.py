"""Pairwise weight matching (git re-basin) and MergeMany, with the Hungarian algorithm from scipy.

Weight matching (Ainsworth et al., 2023) aligns model ``b`` to model ``a`` one permutation group at a
time: with every other group fixed, the best permutation of group ``g`` maximizes
``sum_W <W_a, W_b permuted>``, a linear assignment problem over the ``(n, n)`` matrix
``C = sum_{(W, axis) in g} unfold(W_a, axis) unfold(W_b', axis)^T`` (``W_b'``: ``W_b`` permuted on its
other axes), solved exactly by :func:`scipy.optimize.linear_sum_assignment`. Groups are visited in a
random order (seeded) until a whole pass changes nothing. MergeMany aligns each model in turn to the
mean of the others (in their current frames) until no permutation changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment

from ..utils import check_integer
from .specs import Permutations, PermutationSpec, apply_permutation, check_permutations, identity_permutations, invert


def unfold(w: torch.Tensor, axis: int) -> torch.Tensor:
    """``w`` as a matrix ``(w.shape[axis], -1)``: the given axis first, every other axis flattened."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def permute_other_axes(spec: PermutationSpec, perms: Mapping[str, torch.Tensor], name: str, w: torch.Tensor,
                       skip_axis: int) -> torch.Tensor:
    """``w`` (parameter ``name``) permuted on every axis its spec names, except ``skip_axis``."""
    for axis, g in enumerate(spec.axes[name]):
        if g is not None and axis != skip_axis:
            w = w.index_select(axis, perms[g])
    return w


def _check_pair(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, int]:
    sizes = spec.group_sizes(states[0])
    for i, s in enumerate(states[1:], start=1):
        if spec.group_sizes(s) != sizes:
            raise ValueError(f"model {i} has group sizes {spec.group_sizes(s)}, model 0 {sizes}: models to align "
                             "must have the same architecture.")
    return sizes


def weight_matching(spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, init: Permutations | None = None) -> Permutations:
    """Permutations that put ``b`` in the frame of ``a``: ``apply_permutation(spec, perms, b) ~ a``.

    Args:
        spec: the models' permutation spec.
        a, b: state dicts of one architecture.
        max_iter: passes over all groups at most (it stops earlier when a pass changes nothing).
        seed: order in which groups are visited (the result depends on it).
        init: starting permutations (identity by default).

    Returns:
        ``{group: perm (n,)}``; unit ``i`` of ``a`` is matched with unit ``perm[i]`` of ``b``.
    """
    check_integer("max_iter", max_iter)
    sizes = _check_pair(spec, [a, b])
    if init is not None:
        check_permutations(spec, init, sizes)  # init: one permutation of range(size) per group
    perms = {g: p.clone() for g, p in (init or identity_permutations(sizes)).items()}
    a64 = {k: v.detach().double().cpu() for k, v in a.items()}
    b64 = {k: v.detach().double().cpu() for k, v in b.items()}
    rng = torch.Generator().manual_seed(seed)
    groups = sorted(sizes)
    for _ in range(max_iter):
        changed = False
        for gi in torch.randperm(len(groups), generator=rng).tolist():
            g = groups[gi]
            cost = torch.zeros(sizes[g], sizes[g], dtype=torch.float64)
            for name, axis in spec.groups[g]:
                wb = permute_other_axes(spec, perms, name, b64[name], axis)
                cost += unfold(a64[name], axis) @ unfold(wb, axis).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(sizes[g])
            if cost[rows, new].sum() > cost[rows, perms[g]].sum() + 1e-12:
                perms[g], changed = new, True
        if not changed:
            break
    return perms


def average_states(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts with the same keys and shapes."""
    if not states:
        raise ValueError("average_states needs at least one state dict.")
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}


def merge_many(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], max_iter: int = 50,
               seed: int = 0, inner_iter: int = 100) -> list[Permutations]:
    """MergeMany (git re-basin): one permutation per model and group into a shared frame.

    Each model in turn (random order, seeded) is weight-matched to the mean of the others in their
    current frames; passes repeat until no permutation changes or ``max_iter`` passes.

    Returns:
        ``perms[i]``: ``apply_permutation(spec, perms[i], states[i])`` is model ``i`` in the shared frame.
    """
    if len(states) < 2:
        raise ValueError(f"merge_many needs at least two models; got {len(states)}.")
    check_integer("max_iter", max_iter)
    check_integer("inner_iter", inner_iter)
    sizes = _check_pair(spec, states)
    perms = [identity_permutations(sizes) for _ in states]
    rng = torch.Generator().manual_seed(seed)
    for it in range(max_iter):
        changed = False
        for i in torch.randperm(len(states), generator=rng).tolist():
            others = average_states([apply_permutation(spec, perms[j], states[j])
                                     for j in range(len(states)) if j != i])
            new = weight_matching(spec, others, states[i], max_iter=inner_iter, seed=seed + 1000 * it + i,
                                  init=perms[i])
            changed |= any(not torch.equal(new[g], perms[i][g]) for g in sizes)
            perms[i] = new
        if not changed:
            break
    return perms


def pairwise_from_universe(perm_x: Permutations, perm_y: Permutations) -> Permutations:
    """The map that puts model ``y`` in the frame of model ``x``, from their maps into one universe
    (``universe = W.index_select(axis, perm)``): ``perm_xy = perm_y[invert(perm_x)]``."""
    return {g: perm_y[g][invert(perm_x[g])] for g in perm_x}


def merge_aligned(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]],
                  perms: Sequence[Permutations]) -> dict[str, torch.Tensor]:
    """Every model mapped by its permutations into the shared frame, then averaged uniformly."""
    if len(perms) != len(states):
        raise ValueError(f"perms has {len(perms)} entries for {len(states)} states; give one set of permutations "
                         "per model (merge_many and c2m3_frank_wolfe return one per model).")
    return average_states([apply_permutation(spec, p, s) for p, s in zip(perms, states)])
