"""C2M3: cycle-consistent matching of many models by Frank-Wolfe over doubly stochastic matrices.

Every model ``p`` gets one matrix ``P_p,g`` (``(n, n)``, rows: the model's units, columns: the
universe's) per permutation group ``g``; model ``p`` in the universe is ``T_p(W) = W`` multiplied by
``P_p,g^T`` along every axis group ``g`` acts on. The objective, maximized, is

    f(P) = sum_W sum_{p < q} <T_p(W_p), T_q(W_q)>
         = sum_W (||sum_p T_p||^2 - sum_p ||T_p||^2) / 2,

(for permutations the official ``tr(W_p^T P_p,l P_q,l^T W_q (P_p,l' P_q,l'^T)^T)``, summed over pairs
and tensors; conv kernels are contracted over their spatial axes). Its gradient for ``P_p,g`` sums,
over every tensor with an axis ``a`` in ``g``, ``unfold(X, a) unfold(S - T_p, a)^T`` with ``X`` the
tensor transformed on its other axes and ``S = sum_q T_q``. Frank-Wolfe: the linear step ``S_p,g``
maximizes ``<G_p,g, S>`` over permutations (Hungarian); one step size ``t`` in ``[0, 1]`` shared by all
matrices comes from a bounded scalar search (``f`` along the segment is a polynomial of degree at
most twice the number of permuted axes of a tensor, so it is fitted exactly from that many + 1
evaluations and the search runs on the polynomial; each tensor mapped by ``(1 - t) P + t S`` is
``sum_k (1 - t)^(n - k) t^k Y_k``, whose terms come from the gradient's own transforms and index
selections by ``S``, so an evaluation costs no matrix product); ``P <- (1 - t) P + t S``. It stops when the gain stays
below ``tol`` for ``patience`` consecutive iterations or after ``max_iter``; every ``P`` is then rounded
to a permutation by the Hungarian algorithm. Pairwise maps ``P_p P_q^T`` compose to the identity
around any cycle by construction.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment, minimize_scalar
from tqdm.auto import tqdm

from ..utils import check_integer, check_number
from .matching import _check_pair, unfold
from .specs import Permutations, PermutationSpec

Matrices = list[dict[str, torch.Tensor]]
"""Per model, group name to an ``(n, n)`` (doubly stochastic) matrix, float64."""


@dataclass
class FrankWolfeResult:
    """What :func:`c2m3_frank_wolfe` found.

    Attributes:
        perms: per model, ``{group: perm (n,)}``: ``W.index_select(axis, perm)`` is the model in the
            universe.
        objective: ``f`` at the start and after every iteration (soft matrices).
        step_sizes: ``t`` of every iteration.
        objective_rounded: ``f`` at the rounded permutations.
        iterations: iterations run; ``converged``: stopped by the gain rule rather than ``max_iter``.
    """

    perms: list[Permutations]
    objective: list[float] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    objective_rounded: float = float("nan")
    iterations: int = 0
    converged: bool = False

    @property
    def falls(self) -> list[int]:
        """The iterations ``i`` at which :attr:`objective` fell below its value at ``i - 1`` (empty: it never fell)."""
        return [i for i in range(1, len(self.objective)) if self.objective[i] < self.objective[i - 1]]


def _along(w: torch.Tensor, axis: int, m: torch.Tensor) -> torch.Tensor:
    """``m^T`` applied along ``axis`` of ``w``: result index ``u`` is ``sum_i m[i, u] w[i]``."""
    moved = w.movedim(axis, 0)
    out = (m.T @ moved.reshape(moved.shape[0], -1)).reshape(m.shape[1], *moved.shape[1:])
    return out.movedim(0, axis)


def _to_universe(spec: PermutationSpec, mats: Mapping[str, torch.Tensor], name: str, w: torch.Tensor,
                 skip_axis: int | None = None) -> torch.Tensor:
    for axis, g in enumerate(spec.axes[name]):
        if g is not None and axis != skip_axis:
            w = _along(w, axis, mats[g])
    return w


def c2m3_objective(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], mats: Matrices) -> float:
    """``f(P)``: the sum over tensors and pairs ``p < q`` of ``<T_p(W_p), T_q(W_q)>``."""
    total = 0.0
    for name in spec.axes:
        ts = [_to_universe(spec, m, name, s[name]) for m, s in zip(mats, states)]
        summed = torch.stack(ts).sum(0)
        total += 0.5 * (float((summed * summed).sum()) - sum(float((t * t).sum()) for t in ts))
    return total


def _transforms(spec: PermutationSpec, mats: Mapping[str, torch.Tensor], name: str, w: torch.Tensor,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``w`` mapped into the universe on every permuted axis (``full``), and on every permuted axis but
    ``a`` (``partial[a]``, one per permuted axis ``a``); the last partial is reused for ``full``."""
    axes = [a for a, g in enumerate(spec.axes[name]) if g is not None]
    partial = {a: _to_universe(spec, mats, name, w, skip_axis=a) for a in axes}
    full = _along(partial[axes[-1]], axes[-1], mats[spec.axes[name][axes[-1]]]) if axes else w
    return full, partial


def _gradient_and_terms(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], mats: Matrices,
                        ) -> tuple[Matrices, dict[str, list[tuple[torch.Tensor, dict[int, torch.Tensor]]]]]:
    """:func:`c2m3_gradient`, and per permuted tensor and model the transforms it computed on the way
    (:func:`_transforms`), which the line search reuses."""
    grads = [{g: torch.zeros_like(m) for g, m in mm.items()} for mm in mats]
    transforms = {}
    for name in spec.axes:
        if all(g is None for g in spec.axes[name]):
            continue
        tr = [_transforms(spec, m, name, s[name]) for m, s in zip(mats, states)]
        summed = torch.stack([full for full, _ in tr]).sum(0)
        for p, (full, partial) in enumerate(tr):
            rest = summed - full
            for axis, x in partial.items():
                grads[p][spec.axes[name][axis]] += unfold(x, axis) @ unfold(rest, axis).T
        transforms[name] = tr
    return grads, transforms


def c2m3_gradient(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], mats: Matrices) -> Matrices:
    """``df/dP_p,g`` for every model and group, ``(n, n)`` each, summed over every pair and tensor."""
    return _gradient_and_terms(spec, states, mats)[0]


def _segment_terms(spec: PermutationSpec, name: str, w: torch.Tensor, mats: Mapping[str, torch.Tensor],
                   targets: Mapping[str, torch.Tensor], full: torch.Tensor, partial: Mapping[int, torch.Tensor],
                   ) -> list[torch.Tensor]:
    """``[Y_0, ..., Y_n]`` with ``T(t) = sum_k (1 - t)^(n - k) t^k Y_k`` the tensor ``w`` mapped by
    ``(1 - t) P + t S`` on its ``n`` permuted axes (``mats``: ``P``; ``targets``: the permutation
    matrices ``S``, applied as index selections). With ``n <= 2`` every term comes from the
    transforms the gradient already computed (``full``, ``partial``) without a matrix product."""
    axes = [a for a, g in enumerate(spec.axes[name]) if g is not None]
    index = {a: targets[spec.axes[name][a]].argmax(0) for a in axes}  # S^T along a: entry u is w[index[u]]
    if len(axes) == 1:
        (a,) = axes
        return [full, w.index_select(a, index[a])]
    if len(axes) == 2:
        a, b = axes
        return [full, partial[a].index_select(a, index[a]) + partial[b].index_select(b, index[b]),
                w.index_select(a, index[a]).index_select(b, index[b])]
    terms = [w]  # more permuted axes: expand axis by axis (Y_k of the axes so far)
    for a in axes:
        m = mats[spec.axes[name][a]]
        new = [_along(y, a, m) for y in terms] + [torch.zeros(())]
        for k, y in enumerate(terms):
            new[k + 1] = new[k + 1] + y.index_select(a, index[a])
        terms = new
    return terms


def _along_segment(terms: Mapping[str, list[list[torch.Tensor]]], constant: float, t: float) -> float:
    """``f((1 - t) P + t S)`` from every tensor's :func:`_segment_terms` per model, plus ``constant``
    (the tensors no group permutes)."""
    total = constant
    for per_model in terms.values():
        ts = []
        for ys in per_model:
            n = len(ys) - 1
            ts.append(sum(((1 - t) ** (n - k)) * (t ** k) * y for k, y in enumerate(ys)))
        summed = torch.stack(ts).sum(0)
        total += 0.5 * (float((summed * summed).sum()) - sum(float((x * x).sum()) for x in ts))
    return total


def sinkhorn(m: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Alternate row and column normalization of a positive matrix: a doubly stochastic matrix."""
    for _ in range(iters):
        m = m / m.sum(1, keepdim=True)
        m = m / m.sum(0, keepdim=True)
    return m


def hungarian(score: torch.Tensor) -> torch.Tensor:
    """The permutation matrix (float64) maximizing ``<score, P>``: exact, by ``linear_sum_assignment``."""
    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    out = torch.zeros_like(score, dtype=torch.float64)
    out[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return out


def round_to_permutation(m: torch.Tensor) -> torch.Tensor:
    """The index permutation (``W.index_select(axis, perm)`` maps to the universe) closest to ``m``
    (``(n_model, n_universe)``): the Hungarian algorithm on ``m``."""
    _, cols = linear_sum_assignment(m.detach().cpu().numpy(), maximize=True)
    return torch.argsort(torch.as_tensor(cols, dtype=torch.long))


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``P`` with ``P[perm[u], u] = 1`` (float64), the matrix form of an index permutation."""
    return torch.eye(perm.numel(), dtype=torch.float64)[:, perm]


def objective_at(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]],
                 perms: Sequence[Permutations]) -> float:
    """:func:`c2m3_objective` at permutations: ``f`` of the maps ``perms[p]`` of model ``p`` into one frame
    (``W.index_select(axis, perm)``, the convention of :class:`FrankWolfeResult` and of
    :func:`mergelab.alignment.matching.merge_many`), computed in float64. Any method that maps every model
    into one frame can be scored by C2M3's objective this way: MergeMany's maps, the identity (no alignment)."""
    if len(perms) != len(states):
        raise ValueError(f"perms has {len(perms)} entries for {len(states)} models; give one mapping per model.")
    s64 = [{k: v.detach().double().cpu() for k, v in s.items()} for s in states]
    return c2m3_objective(spec, s64, [{g: permutation_matrix(p) for g, p in pp.items()} for pp in perms])


def check_frank_wolfe_options(options: Mapping[str, Any]) -> None:
    """Refuse a key of ``options`` that :func:`c2m3_frank_wolfe` does not take as a tuning option (``max_iter``,
    ``tol``, ``patience``, ``noise``), naming it and the valid ones."""
    valid = [k for k in inspect.signature(c2m3_frank_wolfe).parameters if k not in ("spec", "states", "seed", "progress")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"frank_wolfe has {unknown[0]!r}, which is not an option of C2M3's Frank-Wolfe; valid: "
                         f"{', '.join(valid)}.")


def c2m3_frank_wolfe(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], max_iter: int = 200,
                     tol: float = 1e-6, patience: int = 5, noise: float = 0.01, seed: int = 0,
                     progress: bool = False) -> FrankWolfeResult:
    """C2M3's maps of every model into one universe (see the module docstring).

    Args:
        spec: the models' permutation spec.
        states: state dicts of one architecture (two or more).
        max_iter: Frank-Wolfe iterations at most.
        tol: a gain ``f(new) - f(old)`` below ``tol`` counts towards stopping (relative to ``|f(old)|``
            when that exceeds 1, so the rule does not depend on the weights' scale).
        patience: stop after this many consecutive small gains.
        noise: relative noise added to the uniform start before Sinkhorn normalization.
        seed: the start's noise.
        progress: a tqdm bar over iterations.
    """
    if len(states) < 2:
        raise ValueError(f"c2m3_frank_wolfe needs at least two models; got {len(states)}.")
    check_integer("max_iter", max_iter)
    check_integer("patience", patience)
    check_number("tol", tol, low=0)
    check_number("noise", noise, low=0)
    sizes = _check_pair(spec, states)
    s64 = [{k: v.detach().double().cpu() for k, v in s.items()} for s in states]
    rng = torch.Generator().manual_seed(seed)
    mats = [{g: sinkhorn((1 + noise * torch.rand(n, n, generator=rng, dtype=torch.float64)) / n)
             for g, n in sorted(sizes.items())} for _ in states]
    degree = 2 * max(sum(g is not None for g in axes) for axes in spec.axes.values())
    res = FrankWolfeResult(perms=[])
    f = c2m3_objective(spec, s64, mats)
    constant = _along_segment({name: [[s[name]] for s in s64] for name, axes in spec.axes.items()
                               if all(g is None for g in axes)}, 0.0, 0.0)  # tensors no group permutes
    res.objective.append(f)
    small = 0
    bar = tqdm(range(max_iter), desc="C2M3 Frank-Wolfe", disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        grads, transforms = _gradient_and_terms(spec, s64, mats)
        targets = [{g: hungarian(gr) for g, gr in gg.items()} for gg in grads]

        def step(t: float) -> Matrices:
            return [{g: (1 - t) * m[g] + t * s[g] for g in m} for m, s in zip(mats, targets)]

        # f along the segment is a polynomial of degree <= `degree` in t, evaluated cheaply from each
        # tensor's segment terms: fitted exactly from degree + 1 evaluations, then searched as the
        # official code does (bounded, xtol 1e-3, 20 evaluations)
        terms = {name: [_segment_terms(spec, name, s[name], m, tg, *tr[p])
                        for p, (m, s, tg) in enumerate(zip(mats, s64, targets))]
                 for name, tr in transforms.items()}
        nodes = np.linspace(0.0, 1.0, degree + 1)
        values = [f] + [_along_segment(terms, constant, float(t)) for t in nodes[1:]]
        along = np.polynomial.Polynomial.fit(nodes, values, degree)
        search = minimize_scalar(lambda t: -along(t), bounds=(0.0, 1.0), method="bounded",
                                 options={"xatol": 1e-3, "maxiter": 20})
        t = float(search.x)
        new_f = values[-1] if t == 1.0 else _along_segment(terms, constant, t)
        if values[-1] > new_f:  # the bounded search never evaluates the end points themselves
            t, new_f = 1.0, values[-1]
        if new_f < f:  # the bounded search brackets [0, 1] but never evaluates 0 itself
            t, new_f = 0.0, f
        mats = step(t)
        gain = new_f - f
        f = new_f
        res.objective.append(f)
        res.step_sizes.append(t)
        res.iterations += 1
        bar.set_postfix(objective=f"{f:.4g}", t=f"{t:.3f}")
        small = small + 1 if gain < tol * max(1.0, abs(res.objective[-2])) else 0
        if small >= patience:
            res.converged = True
            break
    res.perms = [{g: round_to_permutation(m) for g, m in mm.items()} for mm in mats]
    res.objective_rounded = objective_at(spec, s64, res.perms)
    return res
